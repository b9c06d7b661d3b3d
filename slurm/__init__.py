"""SLURM (and local) launchers through submitit: ``python -m slurm {pretrain,transfer,status,collect}``.

- :mod:`slurm.options`: job resources -> submitit / sbatch parameters (one task per GPU).
- :mod:`slurm.launch`: executors, the dry-run sbatch script, :func:`slurm.launch.submit_pretrain`.
- :mod:`slurm.pretrain_job`: the pretraining callable (distributed env, engine, requeue on preemption).
- :mod:`slurm.preemption`: USR2/SIGTERM -> the engine's graceful stop -> checkpoint -> requeue.
- :mod:`slurm.transfer`: backbone conversion + Detectron2/MMSegmentation jobs chained ``afterok``.
- :mod:`slurm.state`, :mod:`slurm.registry`: job states without accounting, ``RUN_DIR/jobs.json``.
- :mod:`slurm.collect`, :mod:`slurm.published`: results table next to SlotCon's Tables 2-3.
"""
