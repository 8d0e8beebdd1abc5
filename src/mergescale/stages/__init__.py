"""Neutral machinery for cached, resumable work: content keys, atomic stage outputs and a process scheduler.

The world build (:mod:`mergescale.world.build`) and the study runner (:mod:`mergescale.study`) are its clients:

* :mod:`.keys` — ``stage_key``: a short stable hash of everything a piece of work reads;
* :mod:`.store` — ``StageStore``: stage outputs written atomically, skipped when their record matches their key;
* :mod:`.scheduler` — ``Scheduler``: jobs with dependencies and priorities, run in this process or on a pool of
  spawned worker processes that die with their parent (:mod:`.lifetime`).
"""
