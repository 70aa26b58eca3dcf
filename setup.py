"""MPViT: Multi-Path Vision Transformer for Dense Prediction. Exact versions: requirements.txt."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name='mpvit',
    version='0.1.0',
    description='MPViT (CVPR 2022) as a timm model, with Detectron2, mmsegmentation and Deformable DETR adapters',
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['mpvit', 'mpvit.*']),
    package_data={'mpvit': ['model_zoo.json']},
    python_requires='>=3.10',
    # torch 2.6: weights_only loading with named allowlist entries (mpvit.serialization).
    install_requires=['torch>=2.6', 'torchvision', 'timm>=1.0.15', 'fvcore', 'safetensors', 'huggingface_hub',
                      'filelock'],
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
