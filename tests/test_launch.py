"""Multi-process launches on this CPU (2 processes joined by jax.distributed) and the checks
every process agrees on; the cluster scripts with stand-in `gcloud` / `srun` that record what
would run on each host, and JAX's cluster detection evaluated in each simulated task's
environment."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import pytest

from robustjax import distributed
from robustjax.training import _setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _job_env(devices):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'ROBUSTJAX_'))}
  # The run's other XLA flags travel on (the default run's optimisation level: conftest.py).
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env.update(
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=' '.join([f'--xla_force_host_platform_device_count={devices}', *flags]),
    PYTHONPATH=ROOT,
  )
  return env


def _run_job(per_process_args, *, devices=2, timeout=240, env_of=None):
  """Starts one `robustjax train` process per entry of `per_process_args` (joined on a local
  coordinator); returns (exit codes, outputs, seconds)."""
  port = _free_port()
  n = len(per_process_args)
  procs = []
  t0 = time.perf_counter()
  for i, args in enumerate(per_process_args):
    env = _job_env(devices)
    if env_of:
      env.update(env_of(i))
    cmd = [sys.executable, '-m', 'robustjax', 'train', f'--coordinator_address=localhost:{port}']
    cmd += [f'--num_processes={n}', f'--process_id={i}', *args]
    procs.append(
      subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [p.returncode for p in procs], outs, time.perf_counter() - t0


def _last_line(text):
  return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.parametrize('resume', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_local_multiprocess_script_trains_checkpoints_and_resumes(tmp_path, resume):
  """launch/local_multiprocess.sh: 2 processes x 2 CPU devices, checkpoints in the shared
  workdir, the final metrics of a one-process run, and (slow) a rerun of the same command
  resumes."""
  env = _job_env(2)
  env.update(NUM_PROCESSES='2', DEVICES_PER_PROCESS='2', PORT=str(_free_port()))
  env['PYTHON'] = sys.executable
  env['WORKDIR'] = str(tmp_path / 'run')
  script = os.path.join(ROOT, 'launch', 'local_multiprocess.sh')
  out = subprocess.run(['bash', script], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['num_devices'] == 4 and summary['finished']
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['3', '6']
  # The same run in one process with 4 devices: the same numbers.
  from robustjax import configs, training

  one = training.train_and_evaluate(configs.get('default', 'smoke'), str(tmp_path / 'one'))
  assert summary['final']['test_accuracy'] == pytest.approx(one['final']['test_accuracy'])
  assert summary['final']['test_loss'] == pytest.approx(one['final']['test_loss'], rel=1e-5)
  if resume:
    again = subprocess.run(['bash', script], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    log0 = (tmp_path / 'run.logs' / 'process_0.log').read_text()
    assert 'already finished' in log0


def test_default_workdirs_of_different_commands_differ(tmp_path):
  """Two commands of the script do not share a default workdir (the hash of their arguments)."""
  script = os.path.join(ROOT, 'launch', 'local_multiprocess.sh')
  env = {**os.environ, 'PYTHON': 'false', 'NUM_PROCESSES': '1'}  # the process fails at once
  dirs = []
  for extra in ([], ['--config.rule=median']):
    out = subprocess.run(['bash', script, *extra], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    dirs.append(out.stdout.split('workdir ')[1].split(')')[0])
  assert dirs[0] != dirs[1] and all(d.startswith('/tmp/robustjax_multiprocess/') for d in dirs)
  for d in dirs:
    shutil.rmtree(d + '.logs', ignore_errors=True)


def test_a_workdir_local_to_each_host_fails_every_process(tmp_path):
  """Each process given its own folder (a local workdir per host): both fail at start, fast,
  naming the problem, instead of timing out in orbax."""
  base = ['--config=default:smoke']
  rcs, outs, seconds = _run_job([base + [f'--workdir={tmp_path / f"host{i}"}'] for i in (0, 1)])
  assert rcs == [1, 1], outs
  for out in outs:
    assert 'is not a directory shared by every process' in _last_line(out)
  assert seconds < 120


def test_one_process_failing_to_build_ends_every_process(tmp_path):
  """A host without the data files: that process names the problem, the other says which
  process failed; both exit."""
  base = ['--config=default:smoke', f'--workdir={tmp_path}', '--config.checkpoint_every=0']
  bad = ['--config.dataset=mnist', f'--config.data_dir={tmp_path / "missing"}']
  rcs, outs, _ = _run_job([base, base + bad])
  assert rcs == [1, 1], outs
  assert 'process(es) [1] of 2 failed to build the experiment' in _last_line(outs[0])
  assert 'process 1: mnist: no dataset files' in _last_line(outs[1])


def test_uneven_workers_are_refused_with_several_processes(monkeypatch):
  from robustjax import configs

  c = configs.get('default', 'smoke')
  c.num_workers = 10
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'num_workers=10 must be a multiple of 8 \(e.g. 16\)'):
    _setup.choose_backend(c)
  c.num_workers, c.backend = 16, 'vmap'
  with pytest.raises(ValueError, match='duplicate of the whole job'):
    _setup.choose_backend(c)
  c.backend = 'auto'
  assert _setup.choose_backend(c)[0] == 'shard_map'


def test_device_count_check(monkeypatch):
  monkeypatch.setenv('ROBUSTJAX_EXPECT_DEVICES', '16')
  with pytest.raises(RuntimeError, match='given 16 devices but JAX sees 8'):
    distributed.check_device_count()
  distributed.check_device_count(8)
  monkeypatch.delenv('ROBUSTJAX_EXPECT_DEVICES')
  distributed.check_device_count()  # nothing to check


def test_source_fingerprint_changes_with_the_code(tmp_path):
  copy = tmp_path / 'robustjax'
  shutil.copytree(os.path.join(ROOT, 'robustjax'), copy, ignore=shutil.ignore_patterns('*.pyc'))
  code = (
    'import sys; sys.path.insert(0, sys.argv[1]); from robustjax import distributed; '
    'print(distributed.source_fingerprint())'
  )
  run = lambda: subprocess.run(
    [sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, check=True
  ).stdout.strip()
  before = run()
  assert before == distributed.source_fingerprint()  # the same files, the same hash
  with open(copy / 'stack.py', 'a') as fh:
    fh.write('\n# an edit on one host\n')
  assert run() != before


# ------------------------------------------------------------------------------------------------
# Cluster scripts with stand-in commands
# ------------------------------------------------------------------------------------------------

_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in gcloud: records each call; `ssh --worker=all --command=C` runs C on every simulated
# host (a HOME of its own, the host stand-ins first on PATH).
echo "gcloud $*" >> "$STUB_LOG"
if [[ "$*" == *" describe "* ]]; then echo "10.0.0.1;10.0.0.2"; exit 0; fi
cmd=""; worker=all
for a in "$@"; do
  case "$a" in --command=*) cmd="${a#--command=}" ;; --worker=*) worker="${a#--worker=}" ;; esac
done
if [[ "$4" == scp ]]; then  # gcloud compute tpus tpu-vm scp SRC TPU:~/DST ...
  src="$5"; dst="${6#*:~/}"
  for ((w = 0; w < HOSTS; w++)); do cp "$src" "$FAKE/host$w/$dst"; done
  exit 0
fi
if [[ "$4" == ssh ]]; then
  if [[ "$worker" == all ]]; then ws=$(seq 0 $((HOSTS - 1))); else ws=$worker; fi
  for w in $ws; do
    mkdir -p "$FAKE/host$w"
    HOME="$FAKE/host$w" PATH="$HOSTBIN:$PATH" STUB_HOST=$w bash -c "$cmd" || exit $?
  done
fi
"""

_HOST_PYTHON3 = r"""#!/usr/bin/env bash
# The image's python3 (3.10 when HOST_PY_OLD=1).
echo "host$STUB_HOST python3 $*" >> "$STUB_LOG"
case "$*" in
  *"version_info < (3, 11)"*) exit "${HOST_PY_OLD:-0}" ;;
  "-m venv "*) mkdir -p "$3/bin"; cp "$HOSTBIN/venv_python" "$3/bin/python" ;;
  "-m pip install -q --user uv")
    mkdir -p "$HOME/.local/bin" && cp "$HOSTBIN/uv" "$HOME/.local/bin/uv" ;;
esac
"""

_HOST_UV = r"""#!/usr/bin/env bash
echo "host$STUB_HOST uv $*" >> "$STUB_LOG"
dir="${@: -1}"; mkdir -p "$dir/bin"; cp "$HOSTBIN/venv_python" "$dir/bin/python"
"""

_HOST_VENV_PYTHON = r"""#!/usr/bin/env bash
echo "host$STUB_HOST venv-python $*" >> "$STUB_LOG"
case "$*" in
  "-c import jax") [[ -f "$HOME/.jax" ]] || exit 1 ;;
  *"-U jax[tpu]"*) touch "$HOME/.jax" ;;
  *"print("*) echo "jax 0.10.2 robustjax 0.1.0" ;;
esac
"""


def _stand_ins(tmp_path, hosts=2, old_python=False):
  bin_dir, host_bin, fake = tmp_path / 'bin', tmp_path / 'hostbin', tmp_path / 'hosts'
  for d in (bin_dir, host_bin, fake):
    d.mkdir(parents=True)
  for folder, name, text in (
    (bin_dir, 'gcloud', _GCLOUD),
    (host_bin, 'python3', _HOST_PYTHON3),
    (host_bin, 'uv', _HOST_UV),
    (host_bin, 'venv_python', _HOST_VENV_PYTHON),
    (host_bin, 'pkill', '#!/usr/bin/env bash\necho "host$STUB_HOST pkill $*" >> "$STUB_LOG"\n'),
  ):
    (folder / name).write_text(text)
    (folder / name).chmod(0o755)
  log = tmp_path / 'calls.log'
  log.touch()
  env = {
    **os.environ,
    'PATH': f'{bin_dir}:{os.environ["PATH"]}',
    'STUB_LOG': str(log),
    'HOSTBIN': str(host_bin),
    'FAKE': str(fake),
    'HOSTS': str(hosts),
    'HOST_PY_OLD': '1' if old_python else '0',
    'TPU_NAME': 'my-tpu',
    'ZONE': 'us-central2-b',
  }
  return env, log


def _tpu(env, *args, **extra):
  script = os.path.join(ROOT, 'launch', 'tpu_vm.sh')
  return subprocess.run(
    ['bash', script, *args], env={**env, **extra}, capture_output=True, text=True, timeout=300
  )


def test_tpu_vm_script_ships_one_wheel_and_gets_a_recent_python(tmp_path):
  env, log = _stand_ins(tmp_path, hosts=2, old_python=True)  # the image's Python is 3.10
  out = _tpu(env, '--config.num_workers=64', WORKDIR='/mnt/shared/run1')
  assert out.returncode == 0, out.stdout + out.stderr
  calls = log.read_text().splitlines()
  # One wheel, built here, copied to every host with one scp --worker=all.
  scp = [c for c in calls if c.startswith('gcloud compute tpus tpu-vm scp')]
  assert len(scp) == 1 and '--worker=all' in scp[0]
  wheels = sorted((tmp_path / 'hosts').glob('host*/robustjax_dist/*/robustjax-*.whl'))
  assert len(wheels) == 2 and wheels[0].read_bytes() == wheels[1].read_bytes()
  import zipfile

  assert 'robustjax/distributed.py' in zipfile.ZipFile(wheels[0]).namelist()
  for h in (0, 1):
    mine = [c.split(' ', 1)[1] for c in calls if c.startswith(f'host{h} ')]
    # Python 3.10 on the image: uv fetches 3.12 for the venv; jax[tpu] once; then the wheel.
    assert 'uv venv --seed --python 3.12' in ' '.join(mine)
    assert any('pip install -q -U jax[tpu]' in c for c in mine)
    run = [c for c in mine if '-m robustjax train' in c]
    assert run == [
      'venv-python -m robustjax train --config=default --workdir=/mnt/shared/run1 '
      '--num_processes=2 --config.num_workers=64'
    ]
    assert not any(c.startswith('python ') for c in mine)  # python3 / the venv's, never `python`
  # A second launch reinstalls nothing: the same wheel bytes are installed, jax is there.
  log.write_text('')
  again = _tpu(env, '--config.num_workers=64', WORKDIR='/mnt/shared/run1')
  assert again.returncode == 0 and again.stdout.count('already installed') == 2
  on_hosts = [c for c in log.read_text().splitlines() if c.startswith('host')]
  assert not any('jax[tpu]' in c or ' uv ' in c for c in on_hosts), on_hosts


def test_tpu_vm_script_refuses_local_workdirs_on_several_hosts(tmp_path):
  env, log = _stand_ins(tmp_path, hosts=2)
  out = _tpu(env)
  assert out.returncode == 2 and 'set WORKDIR to a directory they all share' in out.stderr
  assert 'ssh' not in log.read_text()
  # Without checkpoints a local workdir per host is fine; the default one is per command.
  out = _tpu(env, '--config.checkpoint_every=0', MODE='run')
  assert out.returncode == 0, out.stderr
  assert 'robustjax_runs/' in out.stdout and 'follow with: MODE=logs' in out.stdout
  one_host, _ = _stand_ins(tmp_path / 'one', hosts=1)
  out = _tpu(one_host, NUM_HOSTS='1', MODE='run')
  assert (
    out.returncode == 0 and '--num_processes' not in (tmp_path / 'one' / 'calls.log').read_text()
  )


_SRUN = r"""#!/usr/bin/env bash
# Stand-in srun: runs the task command once per task with the SLURM variables of that task.
echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
per_node=$((SLURM_NTASKS / SLURM_NNODES))
for ((t = 0; t < SLURM_NTASKS; t++)); do
  node=$((t / per_node)); local=$((t % per_node))
  if [[ -n "${BIND_GPUS:-}" ]]; then cvd=$local; else cvd=0,1,2,3; fi
  SLURM_PROCID=$t SLURM_LOCALID=$local SLURM_NODEID=$node SLURMD_NODENAME=gpu0$((node + 1)) \
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_NODES=$SLURM_NNODES \
    CUDA_VISIBLE_DEVICES=$cvd "$@" || exit $?
done
"""

_TASK_PYTHON3 = r"""#!/usr/bin/env bash
# The task's python3: records its environment and arguments.
python_real=$(PATH="${PATH#*:}" command -v python3)
record='import json, os, sys; print(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))'
"$python_real" -c "$record" "$@" >> "$TASKS"
"""


def _slurm(tmp_path, *, ntasks_per_node, per_node=False, bind=False, extra_env=None):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (
    ('srun', _SRUN),
    ('scontrol', '#!/usr/bin/env bash\necho gpu01; echo gpu02\n'),
    ('python3', _TASK_PYTHON3),
  ):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  tasks = tmp_path / 'tasks.jsonl'
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM', 'JAX_', 'ROBUSTJAX_'))}
  env.update(
    PATH=f'{bin_dir}:{os.environ["PATH"]}',
    STUB_LOG=str(tmp_path / 'calls.log'),
    TASKS=str(tasks),
    SLURM_JOB_ID='4242',
    SLURM_JOB_NODELIST='gpu[01-02]',
    SLURM_NNODES='2',
    SLURM_NTASKS=str(2 * ntasks_per_node),
    SLURM_GPUS_PER_NODE='a100:4',
    SLURM_CPUS_PER_TASK='8',
    WORKDIR=str(tmp_path / 'run'),
    PER_NODE='1' if per_node else '0',
  )
  if bind:
    env['BIND_GPUS'] = '1'
  env.update(extra_env or {})
  script = os.path.join(ROOT, 'launch', 'slurm_multigpu.sbatch')
  out = subprocess.run(
    ['bash', script, '--config.num_workers=64'], env=env, capture_output=True, text=True
  )
  records = [json.loads(line) for line in tasks.read_text().splitlines()] if tasks.exists() else []
  return out, records


def _jax_local_devices(task_env):
  """What jax.distributed.initialize would use in this task: our launch parameters, then JAX's
  own cluster detection (SLURM) for what they leave unset, evaluated in the task's environment."""
  from jax._src import clusters

  params = distributed.launch_params(env=task_env)
  saved = dict(os.environ)
  try:
    os.environ.clear()
    os.environ.update(task_env)
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      params.get('coordinator_address'),
      params.get('num_processes'),
      params.get('process_id'),
      params.get('local_device_ids'),
      None,
      None,
    )
  finally:
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
  'mode', ['per_gpu', 'per_node', 'per_gpu_bound'], ids=['per-GPU', 'per-node', 'per-GPU-bound']
)
def test_slurm_every_gpu_of_every_node_is_used(tmp_path, mode):
  out, tasks = _slurm(
    tmp_path,
    ntasks_per_node=1 if mode == 'per_node' else 4,
    per_node=mode == 'per_node',
    bind=mode == 'per_gpu_bound',
  )
  assert out.returncode == 0, out.stderr
  assert len(tasks) == (2 if mode == 'per_node' else 8)
  used = {}
  for t in tasks:
    env = t['env']
    assert t['argv'][:2] == ['-m', 'robustjax'] and '--config.num_workers=64' in t['argv']
    assert env['ROBUSTJAX_EXPECT_DEVICES'] == '8' and env['SRUN_CPUS_PER_TASK'] == '8'
    address, num, pid, local = _jax_local_devices(env)
    assert address == 'gpu01:24242' and num == len(tasks) and pid == int(env['SLURM_PROCID'])
    visible = env['CUDA_VISIBLE_DEVICES'].split(',')
    assert all(0 <= i < len(visible) for i in local)  # an ordinal this process has
    used.setdefault(env['SLURMD_NODENAME'], []).extend(visible[i] for i in local)
  assert {node: sorted(ids) for node, ids in used.items()} == {
    'gpu01': ['0', '1', '2', '3'],
    'gpu02': ['0', '1', '2', '3'],
  }


def test_slurm_one_process_per_node_without_device_ids_would_use_one_gpu():
  """The trap the script avoids: JAX's SLURM detection alone gives each process GPU
  SLURM_LOCALID, so one process per node uses GPU 0 of each node only."""
  env = {
    'SLURM_JOB_ID': '1',
    'SLURM_STEP_NODELIST': 'gpu01',
    'SLURM_NTASKS': '2',
    'SLURM_PROCID': '0',
    'SLURM_LOCALID': '0',
    'JAX_NUM_PROCESSES': '2',
  }
  assert _jax_local_devices(env)[3] == [0]
  assert _jax_local_devices({**env, 'ROBUSTJAX_LOCAL_DEVICE_IDS': '0,1,2,3'})[3] == [0, 1, 2, 3]


def test_slurm_refuses_a_task_layout_that_leaves_gpus_idle(tmp_path):
  out, tasks = _slurm(tmp_path, ntasks_per_node=2)
  assert out.returncode == 2 and '--ntasks-per-node=4' in out.stderr and not tasks
