"""Pre-flight checks: the doctor's row type and pure probes (:mod:`.checks`), local and remote
paths of a spec (:mod:`.paths`), and the doctor that collects every row over a backend's own
checks (:mod:`.doctor`, which sits at the API layer: it asks the backends)."""
