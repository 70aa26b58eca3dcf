"""The commands' known dependency noise is silenced (mpvit.quiet), and only that."""
import subprocess
import sys

import pytest

NOISY_IMPORTS = 'import detectron2.modeling, mmseg.models'
ONEDL = 'Could not import OneDL'
NOISE = ('`torch.jit.script` is deprecated', 'Fail to import ``MultiScaleDeformableAttention``')


def _output(code: str) -> str:
    done = subprocess.run([sys.executable, '-W', 'default', '-c', code], capture_output=True, text=True, timeout=300,
                          cwd='/')
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_commands_do_not_print_known_dependency_warnings():
    plain = _output(NOISY_IMPORTS + ', mmseg.datasets')
    assert all(message in plain for message in (*NOISE, ONEDL))  # the dependencies still warn by themselves
    quiet = _output('import mpvit.quiet, mpvit.mmseg; ' + NOISY_IMPORTS + ', mmseg.datasets; import warnings; '
                    "warnings.warn('ours')")
    assert not any(message in quiet for message in (*NOISE, ONEDL))
    assert 'UserWarning: ours' in quiet  # every other warning still shows


def test_mmseg_import_drops_only_the_onedl_line(capsys):
    from mpvit.mmseg import _without_printed_line

    with _without_printed_line('Could not import OneDL'):
        print('before')
        print('Could not import OneDL')
        print('after', end='')
    assert capsys.readouterr().out == 'before\nafter'
