"""The job spec: the one schema (:mod:`.schema`), loading with ``--set`` overrides and located
problems (:mod:`.loader`, :mod:`.problems`, :mod:`.yamlio`), variants, pipelines' loading, the
environment a spec sets (:mod:`.envbuild`), secrets detected by value, and the docs generated
from the schema (:mod:`.docgen`)."""
