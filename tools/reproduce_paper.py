"""Evaluate the released checkpoints on the paper's datasets and print the four tables, in one command.

    python tools/reproduce_paper.py --imagenet /data/imagenet --coco /data/coco \\
        --ade20k /data/ade/ADEChallengeData2016 --output output/paper --gpus 8
    python tools/reproduce_paper.py ... --rows mpvit_small mask_rcnn_mpvit_small_1x   # some rows
    python tools/reproduce_paper.py ... --tasks classification mmseg                  # some tables
    python tools/reproduce_paper.py ... --launcher slurm --partition gpu --gpus 8 --time 240   # one job per row

Each selected row (a released checkpoint of ``mpvit/model_zoo.json``) is evaluated by its own driver with its
own config, exactly the command a user would type (printed, and kept in the row's ``run.json``):
``classification/main.py --eval``, ``detectron2/train_net.py --eval-only``,
``semantic_segmentation/tools/test.py``, ``deformable_detr/main.py --eval``. Each writes
``OUTPUT/<row>/eval_metrics.json`` (its log beside it, ``log.txt``); then the tables are printed with measured,
paper and difference, and written as ``tables.md`` and ``tables.json``.

- The weights are found as everywhere else (``--weights-dir`` = ``$MPVIT_WEIGHTS``, the Hub, the URLs), and
  the datasets checked, for every row before any evaluation starts; a row that cannot run is reported
  with its reason and the others go on.
- A row already measured with the same checkpoint (sha256) on the same data (fingerprint) is skipped;
  ``--force`` runs it again. A row whose driver fails is reported with the driver's one-line error.
- Data layouts: ImageNet ``IMAGENET/val/<wnid>/*.JPEG``; COCO 2017 ``COCO/annotations/instances_val2017.json``
  and ``COCO/val2017/``; ADE20K ``ADE20K/images/validation`` and ``ADE20K/annotations/validation``.
- ``--launcher local`` (default) runs the rows one after another on this machine, each driver with its
  usual multi-GPU launch for ``--gpus N`` (torchrun; Detectron2's ``--num-gpus``). ``--launcher slurm``
  submits one job per row through submitit (``--partition``, ``--gpus`` per job, ``--time`` minutes) and
  collects the tables when the jobs end (``--cluster local`` runs the same jobs as local processes).
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (known dependency warnings off in this command)

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mpvit import eval_results, model_zoo
from mpvit.errors import InvalidInputError, UserError
from mpvit.model_zoo import ZooEntry
from mpvit.training import user_errors_in_one_line
from mpvit.weights import file_sha256

REPO = Path(__file__).resolve().parents[1]  # the checkout: its configs and drivers

TASK_DATA = {'classification': 'imagenet', 'detectron2': 'coco', 'deformable_detr': 'coco', 'mmseg': 'ade20k'}
D2_DATASET = 'mpvit_coco_2017_val'  # COCO val2017 registered from --coco (recorded as 'coco': the paper's rows)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


# ------------------------------------------------------------------------------------------ data

@dataclass
class Dataset:
    """One of the paper's evaluation sets, as found under the user's root: its image count and a fingerprint
    (the annotation file's sha256, or one of its sorted file names), or why it cannot be used."""

    key: str
    root: Optional[Path]
    images: int = 0
    fingerprint: str = ''
    problem: Optional[str] = None


def _image_files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)


def inspect_dataset(key: str, root: Optional[Path]) -> Dataset:
    """Check the layout the drivers read, count the images they will evaluate, fingerprint the data."""
    option = f'--{key.replace("_", "-")}'
    if root is None:
        return Dataset(key, None, problem=f'no {option} given')
    dataset = Dataset(key, root)
    if key == 'imagenet':
        needed = [root / 'val']
    elif key == 'coco':
        needed = [root / 'annotations' / 'instances_val2017.json', root / 'val2017']
    else:
        needed = [root / 'images' / 'validation', root / 'annotations' / 'validation']
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        dataset.problem = f'{option} {root}: {", ".join(missing)} not found'
        return dataset
    if key == 'coco':
        with open(needed[0]) as f:
            dataset.images = len(json.load(f).get('images', []))
        dataset.fingerprint = file_sha256(needed[0])
    else:
        files = _image_files(needed[0]) if key == 'imagenet' else sorted(
            p.name for p in needed[1].iterdir() if p.suffix == '.png')
        dataset.images = len(_image_files(needed[0])) if key == 'ade20k' else len(files)
        dataset.fingerprint = eval_results.fingerprint_names(files)
    if not dataset.images:
        dataset.problem = f'{option} {root}: no images in {needed[-1] if key == "coco" else needed[0]}'
    return dataset


# ------------------------------------------------------------------------------------------ rows

@dataclass
class Row:
    entry: ZooEntry
    dataset: Dataset
    out: Path
    weights: Optional[str] = None
    weights_sha256: str = ''
    status: str = 'pending'  # pending | skipped | measured | failed | cannot run
    reason: str = ''
    seconds: float = 0.0
    command: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.entry.name


def row_command(row: Row, gpus: int, python: str = sys.executable) -> List[str]:
    """The command a user types to evaluate ``row`` with ``gpus`` GPUs (one process per GPU)."""
    entry, root, out, weights = row.entry, row.dataset.root, row.out, row.weights
    config = str(REPO / entry.config)
    torchrun = [python, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus}']
    launch = torchrun if gpus > 1 else [python]
    if entry.task == 'classification':
        return [*launch, str(REPO / 'classification' / 'main.py'), '-c', config, '--eval', '--resume', weights,
                '--data-path', str(root), '--output-dir', str(out)]
    if entry.task == 'detectron2':
        return [python, str(REPO / 'detectron2' / 'train_net.py'), '--config-file', config, '--eval-only',
                '--num-gpus', str(max(gpus, 1)), '--coco-dataset', D2_DATASET,
                str(root / 'annotations' / 'instances_val2017.json'), str(root / 'val2017'),
                'MODEL.WEIGHTS', weights, 'DATASETS.TEST', f"('{D2_DATASET}',)", 'OUTPUT_DIR', str(out)]
    if entry.task == 'mmseg':
        return [*launch, str(REPO / 'semantic_segmentation' / 'tools' / 'test.py'), config, weights,
                '--work-dir', str(out), '--cfg-options', f'data_root={root}',
                *(['--launcher', 'pytorch'] if gpus > 1 else [])]
    if entry.task == 'deformable_detr':
        return [*launch, str(REPO / 'deformable_detr' / 'main.py'), '-c', config, '--eval', '--resume', weights,
                '--coco-path', str(root), '--output-dir', str(out)]
    raise ValueError(f'{entry.name}: unknown task {entry.task!r}')


def select_entries(rows: Optional[Sequence[str]], tasks: Optional[Sequence[str]]) -> List[ZooEntry]:
    entries = model_zoo.entries()
    known = [e.name for e in entries]
    unknown = [r for r in rows or [] if r not in known]
    if unknown:
        raise InvalidInputError(f"--rows: unknown {', '.join(unknown)}; rows: {', '.join(known)}")
    return [e for e in entries if (not rows or e.name in rows) and (not tasks or e.task in tasks)]


def find_weights(row: Row) -> None:
    """The row's checkpoint, found (weights directory, Hub) or downloaded before anything runs."""
    from mpvit.checkpoint import local_checkpoint

    try:
        row.weights = local_checkpoint(row.entry.url)
        row.weights_sha256 = file_sha256(row.weights)
    except (UserError, OSError) as e:
        row.status, row.reason = 'cannot run', ' '.join(str(e).split())


def already_measured(row: Row) -> bool:
    """Measured before with this checkpoint on this data (``run.json`` beside ``eval_metrics.json``)."""
    try:
        previous = json.loads((row.out / 'run.json').read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return ((row.out / 'eval_metrics.json').is_file() and previous.get('status') == 'measured'
            and previous.get('weights_sha256') == row.weights_sha256
            and previous.get('data_fingerprint') == row.dataset.fingerprint)


def plan(args: argparse.Namespace) -> List[Row]:
    """Every selected row with its data, weights and status, found before any evaluation."""
    roots = {'imagenet': args.imagenet, 'coco': args.coco, 'ade20k': args.ade20k}
    entries = select_entries(args.rows, args.tasks)
    needed = {TASK_DATA[e.task] for e in entries}
    datasets = {key: inspect_dataset(key, roots[key]) for key in needed}
    rows = []
    for entry in entries:
        row = Row(entry, datasets[TASK_DATA[entry.task]], args.output / entry.name)
        if row.dataset.problem:
            row.status, row.reason = 'cannot run', row.dataset.problem
        else:
            find_weights(row)
        if row.status == 'pending':
            row.command = row_command(row, args.gpus)
            if not args.force and already_measured(row):
                row.status, row.reason = 'skipped', 'measured before with this checkpoint and data'
        rows.append(row)
    return rows


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def print_plan(rows: List[Row]) -> None:
    to_run = [r for r in rows if r.status == 'pending']
    print(f'[reproduce] {len(rows)} rows: {len(to_run)} to evaluate '
          f'({sum(r.dataset.images for r in to_run):,} images), '
          f"{sum(r.status == 'skipped' for r in rows)} done before, {sum(r.status == 'cannot run' for r in rows)} "
          'that cannot run', flush=True)
    for row in rows:
        what = f'{row.dataset.images:,} images' if row.status == 'pending' else f'{row.status}: {row.reason}'
        print(f'  {row.name:<32} {row.entry.task:<16} {what}', flush=True)


def failure_reason(log: Path, returncode: int) -> str:
    """The driver's one-line error (``error: ...``), else the last line it printed (a traceback's)."""
    try:
        lines = [line.strip() for line in log.read_text(errors='replace').splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith('error: ')]
    last = errors[-1] if errors else (lines[-1] if lines else '')
    return f'{last} (exit code {returncode}; log: {log})' if last else f'exit code {returncode} (log: {log})'


def _environment(args: argparse.Namespace) -> Dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), *filter(None, [env.get('PYTHONPATH')])])
    if args.weights_dir:
        env['MPVIT_WEIGHTS'] = str(args.weights_dir)
    return env


def _record(row: Row, status: str, reason: str = '') -> None:
    row.status, row.reason = status, reason
    (row.out / 'run.json').write_text(json.dumps(dict(
        row=row.name, status=status, reason=reason, command=shlex.join(row.command), seconds=round(row.seconds, 1),
        weights=row.weights, weights_sha256=row.weights_sha256, data_root=str(row.dataset.root),
        data_fingerprint=row.dataset.fingerprint, images=row.dataset.images), indent=2))


def _finish(row: Row, returncode: int) -> None:
    if returncode == 0 and (row.out / 'eval_metrics.json').is_file():
        _record(row, 'measured')
    else:
        _record(row, 'failed', failure_reason(row.out / 'log.txt', returncode))


def _headline(row: Row) -> str:
    try:
        metrics = json.loads((row.out / 'eval_metrics.json').read_text())
    except (OSError, json.JSONDecodeError):
        return ''
    from paper_tables import METRICS  # noqa: PLC0415 (beside this script)

    values = [f'{key} {float(value):.2f}' for key, _, read in METRICS[row.entry.task]
              if (value := read(metrics)) is not None]
    return ', '.join(values)


def run_local(rows: List[Row], args: argparse.Namespace) -> None:
    """The rows one after another on this machine, with progress, elapsed time and an ETA."""
    todo = [r for r in rows if r.status == 'pending']
    total_images, done_images, start = sum(r.dataset.images for r in todo), 0, time.time()
    env = _environment(args)
    for i, row in enumerate(todo, 1):
        row.out.mkdir(parents=True, exist_ok=True)
        print(f'[reproduce] {i}/{len(todo)} {row.name}: {row.dataset.images:,} images\n  $ {shlex.join(row.command)}',
              flush=True)
        began = time.time()
        with open(row.out / 'log.txt', 'w') as log:
            returncode = subprocess.run(row.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO).returncode
        row.seconds = time.time() - began
        _finish(row, returncode)
        done_images += row.dataset.images
        elapsed = time.time() - start
        eta = elapsed / max(done_images, 1) * (total_images - done_images)
        result = _headline(row) if row.status == 'measured' else row.reason
        print(f'  {row.status} in {_duration(row.seconds)}: {result}\n  elapsed {_duration(elapsed)}, '
              f'{len(todo) - i} rows left, ETA {_duration(eta)}', flush=True)


def run_slurm(rows: List[Row], args: argparse.Namespace) -> None:
    """One submitit job per row (the same command, its output in the row's log.txt), then wait for all."""
    import submitit

    todo = [r for r in rows if r.status == 'pending']
    if not todo:
        return
    executor = submitit.AutoExecutor(folder=args.output / 'submitit' / '%j', cluster=args.cluster)
    executor.update_parameters(timeout_min=args.time, gpus_per_node=args.gpus, tasks_per_node=1,
                               cpus_per_task=args.cpus_per_job, name='mpvit-eval',
                               **({'slurm_partition': args.partition} if args.partition else {}))
    env = _environment(args)
    jobs = []
    for row in todo:
        row.out.mkdir(parents=True, exist_ok=True)
        log = shlex.quote(str(row.out / "log.txt"))
        script = f"cd {shlex.quote(str(REPO))} && {shlex.join(row.command)} > {log} 2>&1"
        job = executor.submit(submitit.helpers.CommandFunction(['bash', '-c', script], env=env))
        print(f'[reproduce] {row.name}: job {job.job_id}\n  $ {shlex.join(row.command)}', flush=True)
        jobs.append((row, job, time.time()))
    for i, (row, job, submitted) in enumerate(jobs, 1):
        try:
            job.result()
            returncode = 0
        except Exception:  # noqa: BLE001 (submitit raises FailedJobError / UncompletedJobError: the log says why)
            returncode = 1
        row.seconds = time.time() - submitted
        _finish(row, returncode)
        result = _headline(row) if row.status == 'measured' else row.reason
        print(f'[reproduce] {i}/{len(jobs)} {row.name} {row.status}: {result}', flush=True)


# ------------------------------------------------------------------------------------------ tables

def write_tables(rows: List[Row], args: argparse.Namespace) -> str:
    """The four tables (measured / paper / difference), the status of every row, as Markdown and JSON."""
    import paper_tables  # noqa: PLC0415 (beside this script)

    results = paper_tables.read_results(args.output)
    names = [r.name for r in rows]
    table_rows = paper_tables.build_rows(flops=False, results=results.rows, candidates=results.candidates,
                                         names=names)
    status = ['### Rows', '', '| Row | Status | Images | Time | Detail |', '| --- | --- | --- | --- | --- |']
    for row in rows:
        detail = _headline(row) if row.status in ('measured', 'skipped') else row.reason
        status.append(f'| {row.name} | {row.status} | {row.dataset.images:,} | '
                      f"{_duration(row.seconds) if row.seconds else '-'} | {detail} |")
    text = '\n'.join([paper_tables.render(table_rows, with_results=True, flops=False), *status, '',
                      paper_tables.render_other(results.other)])
    (args.output / 'tables.md').write_text(text)
    (args.output / 'tables.json').write_text(json.dumps(dict(
        rows=table_rows, other_results=results.other,
        runs=[dict(row=r.name, status=r.status, reason=r.reason, images=r.dataset.images, seconds=round(r.seconds, 1))
              for r in rows]), indent=2))
    return text


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--imagenet', type=Path, help='ImageNet-1k root (with val/)')
    parser.add_argument('--coco', type=Path, help='COCO 2017 root (annotations/, val2017/)')
    parser.add_argument('--ade20k', type=Path, help='ADEChallengeData2016 root (images/, annotations/)')
    parser.add_argument('--output', type=Path, default=Path('output/paper'), help='one folder per row, and the tables')
    parser.add_argument('--weights-dir', type=Path, help='the weights directory ($MPVIT_WEIGHTS) for this run')
    parser.add_argument('--rows', nargs='+', metavar='NAME', help='only these rows (names as in model_zoo.json)')
    parser.add_argument('--tasks', nargs='+', choices=model_zoo.TASKS, help='only these tasks')
    parser.add_argument('--gpus', type=int, default=1, help='GPUs per row (local) or per job (slurm)')
    parser.add_argument('--force', action='store_true', help='evaluate rows measured before again')
    parser.add_argument('--dry-run', action='store_true', help='check and print the plan and commands, run nothing')
    parser.add_argument('--launcher', choices=['local', 'slurm'], default='local')
    slurm = parser.add_argument_group('slurm (submitit)')
    slurm.add_argument('--partition', help='Slurm partition')
    slurm.add_argument('--time', type=int, default=240, help='time limit per job, minutes')
    slurm.add_argument('--cpus-per-job', type=int, default=10)
    slurm.add_argument('--cluster', choices=['slurm', 'local'], default='slurm',
                       help="submitit's executor: Slurm, or 'local' to run the same jobs as processes here")
    args = parser.parse_args(argv)
    if args.gpus < 0 or args.time < 1 or args.cpus_per_job < 1:
        parser.error('--gpus must be >= 0, --time and --cpus-per-job >= 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    args = parse_args(argv)
    if args.weights_dir:
        os.environ['MPVIT_WEIGHTS'] = str(args.weights_dir)  # where this process looks, as the drivers will
    args.output.mkdir(parents=True, exist_ok=True)
    rows = plan(args)
    print_plan(rows)
    if args.dry_run:
        for row in rows:
            if row.command:
                print(f'  $ {shlex.join(row.command)}')
        return rows
    (run_slurm if args.launcher == 'slurm' else run_local)(rows, args)
    print(write_tables(rows, args))
    counts = {s: sum(r.status == s for r in rows) for s in ('measured', 'skipped', 'failed', 'cannot run')}
    print(f"[reproduce] {', '.join(f'{n} {s}' for s, n in counts.items())}; tables in {args.output / 'tables.md'} "
          f"and {args.output / 'tables.json'}", flush=True)
    return rows


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
