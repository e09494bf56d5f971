"""The Slurm backend: sbatch/squeue/scancel (:mod:`.backend`), their output parsed (:mod:`.state`),
job arrays (:mod:`.array`), the doctor's checks (:mod:`.preflight`), Slurm over SSH (:mod:`.ssh`) and
jobs from Python through submitit (:mod:`.submitit`)."""
