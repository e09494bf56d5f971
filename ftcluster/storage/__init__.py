"""Run outputs on any fsspec filesystem (local, file://, s3://, gs://); no torch here.

Login-node code (doctor, pipeline, variants) and the training runtime use the same modules:

* :mod:`.uri` - a URI -> (filesystem, path), the local-vs-remote test, small file helpers;
* :mod:`.retry` - the one retry policy: permanent errors fail at once, transient ones back off;
* :mod:`.layout` - :class:`~.layout.OutputLayout`, the one place that knows the folder names;
* :mod:`.commit` - :class:`~.commit.CheckpointStore`, the manifest-last commit protocol;
* :mod:`.lease` - :class:`~.lease.Lease`, one writer per output URI, over :mod:`.leasestore` (the lease
  object and each store's conditional writes);
* :mod:`.fetch` - verified downloads and the once-per-node model cache;
* :mod:`.metrics` - the best-effort metrics.jsonl upload.

Nothing is imported here, so that ``ftcluster.storage.layout`` stays cheap for the CLI.
"""
