"""The training child: the DreamBooth loop the train stage runs as `python -m tasks.training JOB.json` (under
`accelerate launch` for several processes).

A process of its own, so a GPU's memory, a crash or a kill stays with it, and so it imports no Prefect. It reports
JSON lines on stdout and resumes from its newest complete checkpoint. Every random draw comes from a generator seeded
by (seed, step, sample), so a resumed run needs no RNG state and equals an uninterrupted one.

job.py (what the stage hands over), data.py (the latent cache's draws), conditioning.py (text per batch),
build.py (models, optimizer, schedule), step.py (one optimizer step), loop.py (the steps, logging, checkpoint
timing), checkpoints.py, outputs.py (sample weights, the exported model), process.py (events, the parent
watchdog, peak memory), launch.py (the accelerate command the stage runs).
"""
