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
    # configs/ ships as mpvit/configs/ (package data): the model zoo's rows name their configs, and
    # mpvit.model_zoo.config_path finds them in a checkout or, installed, there.
    packages=[*find_packages(include=['mpvit', 'mpvit.*']), 'mpvit.configs'],
    package_dir={'mpvit.configs': 'configs'},
    package_data={'mpvit': ['model_zoo.json'], 'mpvit.configs': ['**/*.yaml', '**/*.py']},
    python_requires='>=3.10',
    # The lower bounds are the versions tested (requirements.txt pins them); older ones are not tested.
    # What the package imports; the frameworks' adapters need their extras (Detectron2 itself is installed by
    # dev/install_detectron2.sh: its PyPI sdist needs a patch).
    install_requires=['torch>=2.14', 'torchvision>=0.29', 'timm>=1.0.31', 'safetensors', 'huggingface_hub',
                      'filelock', 'PyYAML', 'numpy', 'Pillow'],
    extras_require={
        'detectron2': ['pycocotools', 'shapely', 'fvcore'],
        'mmseg': ['onedl-mmengine', 'onedl-mmcv', 'onedl-mmsegmentation'],
        'deformable_detr': ['transformers>=5.23', 'accelerate', 'scipy', 'pycocotools'],
        'onnx': ['onnx', 'onnxruntime', 'onnxscript'],
        'tables': ['fvcore', 'submitit>=1.5.4'],  # tools/paper_tables.py (FLOPs), tools/reproduce_paper.py (Slurm)
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
