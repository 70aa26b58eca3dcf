"""tools/reproduce_paper.py: rows of all four tasks evaluated by their own drivers on tiny datasets in the real
layouts, with synthetic checkpoints in each released format in the weights directory; tables, skipping,
failures in one line, and the submitit launcher (its local executor)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import REPO, load_script

pytest.importorskip('detectron2')
pytest.importorskip('mmseg')
pytest.importorskip('transformers')

ROWS = ['mpvit_tiny', 'mpvit_xsmall', 'mask_rcnn_mpvit_tiny_1x', 'upernet_mpvit_small', 'deformable_detr_mpvit_small']


def _imagenet(root):
    from mpvit.demo_data import write_shapes_imagefolder

    write_shapes_imagefolder(root, num_classes=2, train_per_class=1, val_per_class=2, size=48)
    return root


def _coco(root):
    from mpvit.demo_data import write_shapes_coco

    write_shapes_coco(root, train_images=1, val_images=2, size=(128, 96))
    (root / 'val').rename(root / 'val2017')
    (root / 'annotations' / 'instances_val.json').rename(root / 'annotations' / 'instances_val2017.json')
    return root


def _ade20k(root):
    from test_mmseg import _write_ade

    return _write_ade(root, train=1, val=1)


def _weights(folder):
    """Synthetic checkpoints under the released file names, each in its released format; the heads sized for
    the tiny data (2 classes; COCO shapes: 4 categories, ids 1..4); mpvit_xsmall.pth holds MPViT-T weights."""
    import timm
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from fidelity import golden, synth_state_dict

    import mpvit  # noqa: F401
    from mpvit.d2 import add_mpvit_config

    folder.mkdir()
    torch.manual_seed(0)
    tiny = timm.create_model('mpvit_tiny', num_classes=2).state_dict()
    torch.save({'model': tiny}, folder / 'mpvit_tiny.pth')
    torch.save({'model': tiny}, folder / 'mpvit_xsmall.pth')  # broken: another variant's weights
    cfg = get_cfg()
    add_mpvit_config(cfg)
    cfg.merge_from_file(str(REPO / 'configs/detectron2/mask_rcnn_mpvit_tiny_1x.yaml'))
    cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.WEIGHTS', '', 'MODEL.MPVIT.NORM', 'BN',
                         'MODEL.ROI_HEADS.NUM_CLASSES', '4'])
    torch.save({'model': build_model(cfg).state_dict()}, folder / 'mask_rcnn_mpvit_tiny_1x.pth')
    paper_tables = load_script('tools/paper_tables.py')
    from mpvit import model_zoo
    segmentor = paper_tables.build_model(model_zoo.get('upernet_mpvit_small'))
    torch.save({'state_dict': segmentor.state_dict(), 'meta': {}}, folder / 'upernet_mpvit_small.pth')
    detr = synth_state_dict(golden('manifest_deformable_detr_mpvit_small.json')['tensors'])
    detr = {k: v[:5] if k.startswith('class_embed.') and v.shape[0] == 91 else v for k, v in detr.items()}
    torch.save({'model': detr, 'epoch': 49}, folder / 'deformable_detr_mpvit_small.pth')
    return folder


@pytest.mark.slow
def test_one_command_evaluates_rows_of_every_task(tmp_path, capsys, monkeypatch):
    reproduce = load_script('tools/reproduce_paper.py')
    weights = _weights(tmp_path / 'weights')
    monkeypatch.setenv('MPVIT_WEIGHTS', str(weights))
    data = ['--imagenet', str(_imagenet(tmp_path / 'imagenet')), '--coco', str(_coco(tmp_path / 'coco')),
            '--ade20k', str(_ade20k(tmp_path / 'ade')), '--output', str(tmp_path / 'out')]
    rows = {r.name: r for r in reproduce.main([*data, '--rows', *ROWS, 'retinanet_mpvit_tiny_1x'])}
    out = capsys.readouterr().out
    # Found before any evaluation: the row without weights (offline: its URL fails) cannot run, the others did.
    assert out.index('retinanet_mpvit_tiny_1x') < out.index('[reproduce] 1/5 mpvit_tiny: 4 images')
    assert rows['retinanet_mpvit_tiny_1x'].status == 'cannot run'
    assert 'cannot find the weights retinanet_mpvit_tiny_1x' in rows['retinanet_mpvit_tiny_1x'].reason
    assert '5 to evaluate (13 images)' in out  # 4 + 4 + 2 + 1 + 2
    for name in ('mpvit_tiny', 'mask_rcnn_mpvit_tiny_1x', 'upernet_mpvit_small', 'deformable_detr_mpvit_small'):
        assert rows[name].status == 'measured', (name, rows[name].reason)
        assert (tmp_path / 'out' / name / 'eval_metrics.json').is_file()
    # The broken checkpoint fails alone, with its driver's one line.
    assert rows['mpvit_xsmall'].status == 'failed'
    reason = rows['mpvit_xsmall'].reason
    assert reason.startswith('error: ') and 'mpvit_xsmall.pth: ' in reason and 'does not fit' in reason, reason
    tables = (tmp_path / 'out' / 'tables.md').read_text()
    assert '| mpvit_xsmall | failed | 4 |' in tables and '| retinanet_mpvit_tiny_1x | cannot run |' in tables
    assert 'Other results' in tables  # tiny data: listed apart, not on the paper's rows
    assert '| mpvit_tiny | 78.2 | no results |' in tables
    record = json.loads((tmp_path / 'out' / 'tables.json').read_text())
    assert {r['row']: r['status'] for r in record['runs']}['deformable_detr_mpvit_small'] == 'measured'
    assert len(record['other_results']) == 4
    run = json.loads((tmp_path / 'out' / 'mpvit_tiny' / 'run.json').read_text())
    assert run['command'].startswith(f'{reproduce.sys.executable} {REPO}/classification/main.py -c ')

    # Again, with another checkpoint file for one row: that row is measured again, the failed row runs again,
    # and what was measured with the same checkpoint and data is skipped.
    torch.save({'model': torch.load(weights / 'mpvit_tiny.pth', weights_only=True)['model'], 'epoch': 1},
               weights / 'mpvit_tiny.pth')
    rows = {r.name: r for r in reproduce.main([*data, '--rows', *ROWS])}
    assert sorted(n for n, r in rows.items() if r.status == 'skipped') == \
        sorted(set(ROWS) - {'mpvit_xsmall', 'mpvit_tiny'})
    assert rows['mpvit_xsmall'].status == 'failed' and rows['mpvit_tiny'].status == 'measured'


@pytest.mark.slow
def test_slurm_launcher_through_submitits_local_executor(tmp_path, monkeypatch):
    pytest.importorskip('submitit')
    reproduce = load_script('tools/reproduce_paper.py')
    weights = tmp_path / 'weights'
    weights.mkdir()
    import timm

    import mpvit  # noqa: F401
    torch.save({'model': timm.create_model('mpvit_tiny', num_classes=2).state_dict()}, weights / 'mpvit_tiny.pth')
    monkeypatch.setenv('MPVIT_WEIGHTS', str(weights))
    rows = reproduce.main(['--imagenet', str(_imagenet(tmp_path / 'imagenet')), '--output', str(tmp_path / 'out'),
                           '--rows', 'mpvit_tiny', '--launcher', 'slurm', '--cluster', 'local', '--gpus', '0',
                           '--cpus-per-job', '1', '--time', '10'])
    assert rows[0].status == 'measured', rows[0].reason
    assert json.loads((tmp_path / 'out' / 'mpvit_tiny' / 'eval_metrics.json').read_text())['dataset']['images'] == 4
    assert list((tmp_path / 'out' / 'submitit').rglob('*_submitted.pkl'))
    shutil.rmtree(tmp_path / 'out' / 'submitit')


def test_plan_names_what_is_missing_before_running(tmp_path, capsys):
    """No dataset root, a root of the wrong layout, unknown rows: found and printed, nothing run."""
    reproduce = load_script('tools/reproduce_paper.py')
    (tmp_path / 'coco').mkdir()
    rows = reproduce.main(['--coco', str(tmp_path / 'coco'), '--output', str(tmp_path / 'out'), '--dry-run',
                           '--rows', 'mpvit_tiny', 'mask_rcnn_mpvit_tiny_1x'])
    assert [r.status for r in rows] == ['cannot run', 'cannot run']
    assert rows[0].reason == 'no --imagenet given'
    assert rows[1].reason.startswith(f"--coco {tmp_path / 'coco'}: ") and 'instances_val2017.json' in rows[1].reason
    assert '0 to evaluate' in capsys.readouterr().out
    from mpvit.errors import InvalidInputError
    with pytest.raises(InvalidInputError, match='--rows: unknown mpvit_huge'):
        reproduce.main(['--rows', 'mpvit_huge', '--output', str(tmp_path / 'out')])
