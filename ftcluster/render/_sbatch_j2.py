from jinja2.runtime import LoopContext, Macro, Markup, Namespace, TemplateNotFound, TemplateReference, TemplateRuntimeError, Undefined, escape, identity, internalcode, markup_join, missing, str_join
name = 'sbatch.sh.j2'

def root(context, missing=missing):
    resolve = context.resolve_or_missing
    undefined = environment.undefined
    concat = environment.concat
    cond_expr_undefined = Undefined
    if 0: yield None
    l_0_header = resolve('header')
    l_0_summary = resolve('summary')
    l_0_directives = resolve('directives')
    l_0_requeue = resolve('requeue')
    l_0_max_restarts = resolve('max_restarts')
    l_0_modules = resolve('modules')
    l_0_setup = resolve('setup')
    l_0_exports = resolve('exports')
    l_0_passthrough = resolve('passthrough')
    l_0_payload_var = resolve('payload_var')
    l_0_payload_eof = resolve('payload_eof')
    l_0_payload = resolve('payload')
    l_0_variants = resolve('variants')
    l_0_array_name = resolve('array_name')
    l_0_port_base = resolve('port_base')
    l_0_port_span = resolve('port_span')
    l_0_launch_note = resolve('launch_note')
    l_0_literal_note = resolve('literal_note')
    l_0_launch = resolve('launch')
    try:
        t_1 = environment.filters['join']
    except KeyError:
        @internalcode
        def t_1(*unused):
            raise TemplateRuntimeError("No filter named 'join' found.")
    pass
    yield '#!/bin/bash\n'
    for l_1_line in (undefined(name='header') if l_0_header is missing else l_0_header):
        _loop_vars = {}
        pass
        yield '# '
        yield str(l_1_line)
        yield '\n'
    l_1_line = missing
    yield '# '
    yield str((undefined(name='summary') if l_0_summary is missing else l_0_summary))
    yield '\n'
    for l_1_d in (undefined(name='directives') if l_0_directives is missing else l_0_directives):
        _loop_vars = {}
        pass
        yield '#SBATCH '
        yield str(l_1_d)
        yield '\n'
    l_1_d = missing
    yield '\nset -euo pipefail\n\n# ---- preemption: checkpoint, then requeue ---------------------------------------------------\n# --signal=B:USR2@T signals only this shell, T seconds before the time limit; scancel and\n# preemption send TERM. The traps forward the signal to the training step (srun signals every\n# process of the step, on every node): each rank saves and commits a checkpoint, and the launcher\n# exits 143.\n# A bash trap runs only while the shell waits, so the step runs in the background (see below).\n# Installed first, so that a signal during setup is not lost.\nftc_step=""\nftc_signal=""\n# shellcheck disable=SC2329  # called by the traps below\nftc_forward() {\n  ftc_signal=$1\n  echo "ftcluster: got SIG$1; asking every rank to checkpoint and stop"\n  if [ -n "$ftc_step" ]; then\n    kill -s "$1" "$ftc_step" 2>/dev/null || true\n  fi\n}\nftc_finish() {\n  # Requeue after USR2 (--signal=B:USR2@T, or `scancel --batch --signal=USR2`) unless the step\n  # succeeded, and after a step that stopped with 143 (checkpointed) on a signal of its own. Never\n  # after TERM: that is `scancel` (the job must stay cancelled; requeue would still succeed while\n  # it is completing) or preemption, which Slurm requeues by itself (PreemptMode=REQUEUE).\n  if [ "$1" -ne 0 ] && { [ "$ftc_signal" = USR2 ] || { [ -z "$ftc_signal" ] && [ "$1" -eq 143 ]; }; }; then\n'
    if (undefined(name='requeue') if l_0_requeue is missing else l_0_requeue):
        pass
        yield '    trap - USR2 TERM  # requeueing ends this job; nothing is left to forward\n    echo "ftcluster: requeueing job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}); it resumes from the last committed checkpoint"\n    scontrol requeue "$SLURM_JOB_ID" || echo "ftcluster: scontrol requeue refused (a cancelled job stays cancelled)" >&2\n'
    else:
        pass
        yield '    echo "ftcluster: stopped (status $1); slurm.requeue is false, so resubmit to resume from the last committed checkpoint"\n'
    yield '  fi\n  # An infrastructure fault (status 170: a lost rank or node, a hung rank, a collective error; the\n  # launcher named the first failing rank and host above; or 137: a node\'s launcher was SIGKILLed,\n  # the node lost or the OOM killer, which srun reports over the other nodes\' 170): requeue while\n  # resources.max_restarts allows. The count lives in the job\'s Comment, which a requeue keeps\n  # (SLURM_RESTART_COUNT also counts preemptions). An error of the code or data (1) never requeues.\n  if { [ "$1" -eq 170 ] || [ "$1" -eq 137 ]; } && [ -z "$ftc_signal" ]; then\n'
    if (undefined(name='requeue') if l_0_requeue is missing else l_0_requeue):
        pass
        yield '    ftc_faults=$( (scontrol show job -o "$SLURM_JOB_ID" || true) | sed -n \'s/.* Comment=ftcluster-fault-restarts=\\([0-9]*\\).*/\\1/p\')\n    ftc_faults=${ftc_faults:-0}\n    if [ "$ftc_faults" -lt '
        yield str((undefined(name='max_restarts') if l_0_max_restarts is missing else l_0_max_restarts))
        yield ' ]; then\n      trap - USR2 TERM\n      echo "ftcluster: infrastructure fault (status $1); requeueing job ${SLURM_JOB_ID}, fault restart $((ftc_faults + 1)) of at most '
        yield str((undefined(name='max_restarts') if l_0_max_restarts is missing else l_0_max_restarts))
        yield ' (resources.max_restarts); it resumes from the last committed checkpoint"\n      scontrol update JobId="$SLURM_JOB_ID" Comment="ftcluster-fault-restarts=$((ftc_faults + 1))" \\\n        || echo "ftcluster: could not record the fault restart in the job\'s Comment" >&2\n      scontrol requeue "$SLURM_JOB_ID" || echo "ftcluster: scontrol requeue refused (a cancelled job stays cancelled)" >&2\n    else\n      echo "ftcluster: infrastructure fault (status $1); not requeueing: resources.max_restarts='
        yield str((undefined(name='max_restarts') if l_0_max_restarts is missing else l_0_max_restarts))
        yield ' fault restart(s) spent" >&2\n    fi\n'
    else:
        pass
        yield '    echo "ftcluster: infrastructure fault (status $1); slurm.requeue is false, so resubmit to resume from the last committed checkpoint"\n'
    yield '  elif [ "$1" -eq 1 ]; then\n    echo "ftcluster: an error in the training code, data or settings (status 1; its line is above): not requeued" >&2\n  fi\n  exit "$1"\n}\ntrap \'ftc_forward USR2\' USR2\ntrap \'ftc_forward TERM\' TERM\n\n'
    if ((undefined(name='modules') if l_0_modules is missing else l_0_modules) or (undefined(name='setup') if l_0_setup is missing else l_0_setup)):
        pass
        yield '# ---- software environment --------------------------------------------------------------------\n# With `set +u`: module functions and venv/conda activate scripts often read unset variables.\nset +u\n'
        for l_1_line in (undefined(name='modules') if l_0_modules is missing else l_0_modules):
            _loop_vars = {}
            pass
            yield str(l_1_line)
            yield '\n'
        l_1_line = missing
        if (undefined(name='setup') if l_0_setup is missing else l_0_setup):
            pass
            yield '# slurm.setup, written verbatim (this is your shell):\n'
            for l_1_line in (undefined(name='setup') if l_0_setup is missing else l_0_setup):
                _loop_vars = {}
                pass
                yield str(l_1_line)
                yield '\n'
            l_1_line = missing
        yield 'set -u\n\n'
    yield '# ---- environment for every rank: ftcluster defaults < env < slurm.env -----------------------\n'
    for l_1_line in (undefined(name='exports') if l_0_exports is missing else l_0_exports):
        _loop_vars = {}
        pass
        yield str(l_1_line)
        yield '\n'
    l_1_line = missing
    if (undefined(name='passthrough') if l_0_passthrough is missing else l_0_passthrough):
        pass
        yield "\n# ---- taken from the submitting shell (slurm.env_passthrough; secrets go here) ---------------\n# sbatch's default --export=ALL copies them into the job and srun passes them to every node;\n# their values never appear in this file.\nfor ftc_var in"
        for l_1_name in (undefined(name='passthrough') if l_0_passthrough is missing else l_0_passthrough):
            _loop_vars = {}
            pass
            yield ' '
            yield str(l_1_name)
        l_1_name = missing
        yield '; do\n  if [ -z "${!ftc_var+set}" ]; then\n    echo "ftcluster: $ftc_var is not set; export it in the shell that runs sbatch (listed in slurm.env_passthrough)" >&2\n    exit 1\n  fi\ndone\n'
    yield '\n# ---- the resolved spec and DeepSpeed config every rank trains from ---------------------------\n# srun passes the environment to every node, so no shared filesystem is needed.\n'
    yield str((undefined(name='payload_var') if l_0_payload_var is missing else l_0_payload_var))
    yield "=$(cat <<'"
    yield str((undefined(name='payload_eof') if l_0_payload_eof is missing else l_0_payload_eof))
    yield "'\n"
    yield str((undefined(name='payload') if l_0_payload is missing else l_0_payload))
    yield '\n'
    yield str((undefined(name='payload_eof') if l_0_payload_eof is missing else l_0_payload_eof))
    yield '\n)\nexport '
    yield str((undefined(name='payload_var') if l_0_payload_var is missing else l_0_payload_var))
    yield '\n'
    if (undefined(name='variants') if l_0_variants is missing else l_0_variants):
        pass
        yield '\n# ---- job array: task N trains variant N (the runtime picks it with SLURM_ARRAY_TASK_ID) -----\nftc_variants=('
        yield str(t_1(context.eval_ctx, (undefined(name='variants') if l_0_variants is missing else l_0_variants), ' '))
        yield ')\necho "ftcluster: array task ${SLURM_ARRAY_TASK_ID} trains variant ${ftc_variants[$SLURM_ARRAY_TASK_ID]}"\n# Every task of an array has the name given to sbatch; rename this one <name>-<variant> (what\n# squeue and scontrol show from now on), as a variant is named everywhere else.\nscontrol update JobId="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" JobName='
        yield str((undefined(name='array_name') if l_0_array_name is missing else l_0_array_name))
        yield '-"${ftc_variants[$SLURM_ARRAY_TASK_ID]}" \\\n  || echo "ftcluster: could not rename the task; squeue shows it as '
        yield str((undefined(name='array_name') if l_0_array_name is missing else l_0_array_name))
        yield '" >&2\n'
    yield '\n# ---- rendezvous: c10d on the first node, port derived from the job id -----------------------\n# Override from the submitting shell with FTCLUSTER_RDZV_HOST and FTCLUSTER_RDZV_PORT.\nif [ -n "${FTCLUSTER_RDZV_HOST:-}" ]; then\n  ftc_rdzv_host=$FTCLUSTER_RDZV_HOST\nelse\n  # sed, not head: it reads all of scontrol\'s output, so pipefail never sees a SIGPIPE\n  ftc_rdzv_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)\n  # The node\'s NodeAddr, the address Slurm itself reaches it at: node names often do not resolve\n  # (cloud, several slurmd per host). Slurm sets it to the name when slurm.conf gives none.\n  ftc_rdzv_host=$( (scontrol show node -o "$ftc_rdzv_node" || true) | sed -n \'s/.* NodeAddr=\\([^ ]*\\).*/\\1/p\')\n  ftc_rdzv_host=${ftc_rdzv_host:-$ftc_rdzv_node}\nfi\n# Fail now, not after minutes of c10d retries on every node.\nif command -v getent >/dev/null && ! getent ahosts "$ftc_rdzv_host" >/dev/null; then\n  echo "ftcluster: rendezvous host \'$ftc_rdzv_host\' does not resolve on ${SLURMD_NODENAME:-the first node}; export FTCLUSTER_RDZV_HOST=<first node\'s IP address> in the shell that runs sbatch" >&2\n  exit 1\nfi\nftc_rdzv_port=${FTCLUSTER_RDZV_PORT:-$(('
    yield str((undefined(name='port_base') if l_0_port_base is missing else l_0_port_base))
    yield ' + SLURM_JOB_ID % '
    yield str((undefined(name='port_span') if l_0_port_span is missing else l_0_port_span))
    yield '))}\nftc_rdzv_endpoint=${ftc_rdzv_host}:${ftc_rdzv_port}\necho "==> ftcluster: job ${SLURM_JOB_ID} attempt $((${SLURM_RESTART_COUNT:-0} + 1)) (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}; rendezvous ${ftc_rdzv_endpoint} <=="\n\n# ---- launch: one task per node, each a torchrun with all of the node\'s ranks ----------------\nif [ -n "$ftc_signal" ]; then\n  ftc_finish 143  # signalled during setup: nothing to save yet\nfi\n'
    if (undefined(name='launch_note') if l_0_launch_note is missing else l_0_launch_note):
        pass
        yield str((undefined(name='literal_note') if l_0_literal_note is missing else l_0_literal_note))
        yield '\n'
    yield str(t_1(context.eval_ctx, (undefined(name='launch') if l_0_launch is missing else l_0_launch), ' \\\n  '))
    yield ' &\nftc_step=$!\nftc_rc=0\nwait "$ftc_step" || ftc_rc=$?\nwhile kill -0 "$ftc_step" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait for the step\'s end\n  ftc_rc=0\n  wait "$ftc_step" || ftc_rc=$?\ndone\necho "ftcluster: training step exited with status ${ftc_rc}"\nftc_finish "$ftc_rc"\n'

blocks = {}
debug_info = '3=37&4=41&6=45&7=47&8=51&36=55&50=62&53=65&55=67&60=69&73=75&77=78&78=81&80=84&82=87&83=90&90=95&91=98&93=101&98=104&108=112&109=116&110=118&112=120&113=122&116=125&120=127&121=129&141=132&149=136&150=138&152=140'

# Generated from templates/sbatch.sh.j2 by Jinja2: `python -m ftcluster.render.template > ftcluster/render/_sbatch_j2.py`.
# Do not edit; edit the template and regenerate.
# ruff: noqa
