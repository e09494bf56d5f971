"""The local backend: runs a job on this machine, detached (:mod:`.backend`, :mod:`.supervisor`),
and finds every process of a run (:mod:`.proctree`)."""
