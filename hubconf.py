"""torch.hub entry points: ``torch.hub.load('/path/to/this/checkout', 'mpvit_small', source='local', pretrained=True)``
(this repository has no public GitHub address; the authors' ``youngwanLEE/MPViT`` has no hubconf.py).

Each entry point is timm's ``create_model`` for that variant (the same model, weights and keyword arguments:
``num_classes``, ``features_only``, ``in_chans``, ...). ``pretrained=True`` finds the authors' ImageNet
checkpoint as every other path of this repository does (the weights directory ``$MPVIT_WEIGHTS``, the Hub,
then the URLs), read without running code from it.
"""
dependencies = ['torch', 'timm']

import timm as _timm  # noqa: E402

import mpvit as _mpvit  # noqa: E402,F401  (registers the models with timm)


def _entry(name: str):
    def create(pretrained: bool = False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__doc__ = f"MPViT ({name.removeprefix('mpvit_')}): timm.create_model('{name}', pretrained, **kwargs)."
    return create


mpvit_tiny = _entry('mpvit_tiny')
mpvit_xsmall = _entry('mpvit_xsmall')
mpvit_small = _entry('mpvit_small')
mpvit_base = _entry('mpvit_base')
