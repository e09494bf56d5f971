"""The launch plan: every fact a renderer, a backend or the planner needs, computed once from a
validated spec (:mod:`.launch`); the payload the training entry point reads (:mod:`.payload`);
the Slurm request (:mod:`.slurm_request`); the training engines' torch-free recipes
(:mod:`.engines`) and the DeepSpeed config one of them contributes (:mod:`.deepspeed`); the
speed-up decisions the runtime imports (:mod:`.speedups`); the small derived facts (global batch,
array value, log pattern: :mod:`.facts`); and the planner's predictions beside it (:mod:`.planner`)."""
