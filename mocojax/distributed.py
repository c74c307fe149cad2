"""Multi-process start-up: one JAX process per host (TPU VM worker, GPU node or SLURM task).

`initialize` must run before anything touches devices (jax.devices(), the first jit, a
TensorFlow GPU query): once the backend is up, JAX cannot join a multi-process job any more.
It decides how this process was launched, in this order:

  1. explicit --coordinator_address / --num_processes / --process_id (main.py's flags), or the
     same three from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: any GPU
     cluster, or a local multi-process test;
  2. a SLURM step with more than one task (srun sets SLURM_STEP_NODELIST, SLURM_NTASKS,
     SLURM_PROCID, ...), or an Open MPI launch of more than one rank (mpirun): JAX detects
     the coordinator (first node of the step), the process count and this process's id;
  3. a Cloud TPU VM (libtpu present and TPU chips visible): JAX reads the workers of the
     slice from the VM's metadata; on a single-host slice this makes a 1-process job;
  4. otherwise one process, and nothing to do.

`check_same_config` then refuses to start a job whose processes disagree on the config: a
host with a stale checkout or a mistyped override would otherwise compute a different step,
and the collectives would mix the two silently (or hang).
"""

import hashlib
import json
import os

import jax
import numpy as np
from absl import logging

_ENV_ADDRESS, _ENV_COUNT, _ENV_ID = 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'
# What jax's own SLURM detection (jax._src.clusters.SlurmCluster) needs: only srun sets the
# STEP variables, so a plain `sbatch script.py` (one task) is not mistaken for a job step.
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')


def _on_cloud_tpu_vm() -> bool:
  # jax sets this flag while importing when it finds libtpu and TPU chips on the machine
  # (cloud_tpu_init), without starting a backend. It is not public API, hence the getattr.
  from jax._src import cloud_tpu_init
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def launch(coordinator_address=None, num_processes=None, process_id=None, environ=None):
  """(kind, kwargs for jax.distributed.initialize); kind is None for a single process.

  Pure (reads only `environ` and the TPU flag), so every branch is testable on one machine.
  """
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(_ENV_ADDRESS)
  count = num_processes if num_processes is not None else env.get(_ENV_COUNT)
  pid = process_id if process_id is not None else env.get(_ENV_ID)
  if address or count is not None or pid is not None:
    if None in (address, count, pid) or address == '':
      raise ValueError(
          'A multi-process launch needs all three of --coordinator_address (host:port of '
          f'process 0), --num_processes and --process_id (or {_ENV_ADDRESS}, {_ENV_COUNT}, '
          f'{_ENV_ID}); got address={address!r}, num_processes={count!r}, process_id={pid!r}.')
    count, pid = int(count), int(pid)
    if count == 1:
      return None, {}
    return 'explicit', dict(coordinator_address=address, num_processes=count, process_id=pid)
  if all(v in env for v in _SLURM_VARS) and int(env['SLURM_NTASKS']) > 1:
    return 'slurm', {}
  if 'OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'ompi', {}
  if environ is None and _on_cloud_tpu_vm():
    return 'tpu', {}
  return None, {}


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool:
  """Joins the multi-process job this process belongs to, if any; True if it did."""
  kind, kwargs = launch(coordinator_address, num_processes, process_id)
  if kind is None:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(**kwargs)  # empty kwargs: JAX detects the cluster
  logging.info('JAX distributed (%s): process %d of %d, %d local / %d global devices.', kind,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def config_digest(config, workdir: str = '') -> str:
  """sha256 of the resolved config (and workdir) as canonical JSON."""
  text = json.dumps({'config': json.loads(config.to_json_best_effort()), 'workdir': workdir},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config, workdir: str = ''):
  """Raises, on every process, if any process runs a different config or workdir."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = config_digest(config, workdir)
  words = np.frombuffer(bytes.fromhex(digest), dtype=np.int32)  # 8 words: int32 needs no x64
  every = np.asarray(multihost_utils.process_allgather(words))  # [processes, 8]
  differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
  if differ:
    raise ValueError(
        f'Processes {differ} run a different config or --workdir than process 0 (this is '
        f'process {jax.process_index()}, config sha256 {digest[:12]}). Start every process '
        'with the same code version, the same --config file and the same --config.* '
        'overrides and --workdir (on a TPU pod: one `gcloud ... ssh --worker=all` command '
        'after copying the same checkout to every worker).')
