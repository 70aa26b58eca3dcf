"""python -m mpvit.check_data on tiny files: every problem listed with its entry, warnings counted once, the
exit status; and the demo data it is tried on (demo_data --coco --num-classes)."""
from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from mpvit.check_data import main as check_data
from mpvit.demo_data import main as demo_data


def test_demo_data_coco_writes_the_classes_asked_for(tmp_path, capsys):
    """``--num-classes 2`` with ``--coco`` wrote four categories (the option was ignored)."""
    demo_data([str(tmp_path / 'two'), '--coco', '--num-classes', '2', '--train-images', '3', '--val-images', '1'])
    for split in ('train', 'val'):
        dataset = json.loads((tmp_path / 'two' / 'annotations' / f'instances_{split}.json').read_text())
        assert [c['name'] for c in dataset['categories']] == ['disc', 'square']
        assert {a['category_id'] for a in dataset['annotations']} <= {1, 2}
    assert check_data(['coco', str(tmp_path / 'two' / 'annotations' / 'instances_train.json'),
                       str(tmp_path / 'two' / 'train')]) == 0
    assert ': ok: 0 errors, 0 warnings, 3 images' in capsys.readouterr().out


def test_coco_command_lists_every_problem_and_counts_warnings(tmp_path, capsys):
    demo_data([str(tmp_path / 'set'), '--coco', '--train-images', '4', '--val-images', '1'])
    capsys.readouterr()
    path = tmp_path / 'set' / 'annotations' / 'instances_train.json'
    dataset = json.loads(path.read_text())
    dataset['categories'][1]['id'] = 1  # two problems of one kind would be one line, each entry named
    dataset['annotations'][0]['bbox'] = ['a', 1, 2, 3]
    dataset['annotations'][1]['bbox'] = [1.0, 2.0, 0.0, 3.0]  # no area: a warning
    for ann in dataset['annotations']:
        ann.pop('area')
    for ann in dataset['annotations'][1:]:
        ann['category_id'] = 1
    path.write_text(json.dumps(dataset))
    exif = Image.Exif()
    exif[274] = 6  # stored 160x128, shown (and read by Detectron2) 128x160
    Image.new('RGB', (160, 128)).save(tmp_path / 'set' / 'train' / '000002.jpg', exif=exif.tobytes())
    assert check_data(['--show', '0', 'coco', str(path), str(tmp_path / 'set' / 'train')]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:3] == [
        f'error: {path}: 1 category ids are used more than once: 1; give every category its own id',
        f'error: {path}: 1 annotations have a bbox that is not 4 finite numbers: annotation id 1 (image id 1): '
        "['a', 1, 2, 3]; write bbox as [x, y, width, height] in pixels",
        f"error: {path}: 1 images have a width / height that is not the file's: id 2 000002.jpg: json 160x128, "
        'file 128x160 (EXIF orientation 6); write the size of the image as read (EXIF orientation applied) into '
        'width and height']
    assert lines[3].startswith(f'warning: {path}: 1 of {len(dataset["annotations"])} annotations have no box of '
                               'positive width and height: 2;')
    assert lines[4].startswith(f'warning: {path}: 1 images have an EXIF orientation: 000002.jpg (6); Detectron2 '
                               'reads it turned')
    assert lines[-1].startswith(f'{path}: FAILED: 3 errors, 2 warnings, 4 images')
    # Deformable DETR's reader keeps the stored pixels: the json's 160x128 is right for it; areas are filled.
    dataset['categories'][1]['id'] = 2
    dataset['annotations'][0]['bbox'] = [1, 1, 2, 3]
    path.write_text(json.dumps(dataset))
    run = subprocess.run([sys.executable, '-m', 'mpvit.check_data', 'coco', str(path), str(tmp_path / 'set' / 'train'),
                          '--for', 'deformable_detr'], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f'warning: {path}: {len(dataset["annotations"])} annotations have no area: 1, 2, 3' in run.stdout
    assert 'Deformable DETR (torchvision) reads it as stored' in run.stdout
    assert ': ok: 0 errors, ' in run.stdout.strip().splitlines()[-1]
    path.write_text('{"images": [')
    assert check_data_exit(['coco', str(path), str(tmp_path / 'set' / 'train')]) == 2
    assert capsys.readouterr().err.startswith(f'error: {path}: not valid JSON')


def check_data_exit(argv) -> int:
    """The exit status of the command on ``argv`` (2: a user error, printed in one line)."""
    try:
        return check_data(argv)
    except SystemExit as e:
        return e.code
