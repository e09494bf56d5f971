"""The launch plan: every fact a renderer, a backend or the planner needs, computed once from a
validated spec (:mod:`.launch`); the payload the training entry point reads (:mod:`.payload`);
the Slurm request (:mod:`.slurm_request`); and the planner's predictions beside it (:mod:`.planner`)."""
