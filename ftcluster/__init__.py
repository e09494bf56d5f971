"""ftcluster: one validated fine-tuning job spec, compiled to Slurm and Kubernetes launch files.

The public Python API mirrors the CLI verbs and is imported lazily so that
``import ftcluster`` stays cheap (no torch, no kubernetes)::

    import ftcluster
    spec = ftcluster.load_spec("job.yaml", overrides=["training.max_steps=10"])
    files = ftcluster.render(spec, target="slurm")      # {filename: text}
    run = ftcluster.submit(spec, backend="local")        # a Run handle
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_spec", "render", "submit", "compile_plan", "FtclusterError", "SpecError"]


def __getattr__(name: str):
    if name == "load_spec":
        from .spec.loader import load_spec

        return load_spec
    if name == "compile_plan":
        from .plan.launch import compile_plan

        return compile_plan
    if name in ("render",):
        from .render import render

        return render
    if name == "submit":
        from .api import submit

        return submit
    if name in ("FtclusterError", "SpecError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'ftcluster' has no attribute {name!r}")
