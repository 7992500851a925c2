"""Getting a run onto a pod, off the training path: ahead-of-time compilation for TPU topologies from a
CPU host (aot.py, `train.py --aot`) and the Cloud TPU VM / SLURM launchers (jobs.py, `python -m moe.launch`).
"""
