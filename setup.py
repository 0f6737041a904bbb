"""Build script of the ament_python package surfel_perception.

pip dependencies are read from requirements/*.txt, so each version is declared
once; package.xml lists the same dependencies as rosdep keys for ROS builds.
"""

from pathlib import Path

from setuptools import find_packages, setup

PACKAGE_NAME = "surfel_perception"
ROOT = Path(__file__).resolve().parent


def read_requirements(name: str) -> list[str]:
    """Return the requirement lines of requirements/NAME.txt, comments dropped."""
    path = ROOT / "requirements" / f"{name}.txt"
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def share_files(folder: str, pattern: str) -> tuple[str, list[str]]:
    """Return a data_files entry installing FOLDER/PATTERN under share/PACKAGE_NAME."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))
    return (f"share/{PACKAGE_NAME}/{folder}", files)


setup(
    name=PACKAGE_NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "benchmarks", "benchmarks.*"]),
    package_data={
        "quantized_inference_node": [
            "models/*.onnx",
            "models/*.yaml",
            "models/*/*.onnx",
            "models/*/*.yaml",
            "models/*/README.md",
        ]
    },
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE_NAME}"]),
        (f"share/{PACKAGE_NAME}", ["package.xml"]),
        share_files("launch", "*.launch.xml"),
        share_files("config", "*.yaml"),
        share_files("config", "*.xml"),
        share_files("rviz", "*.rviz"),
    ],
    install_requires=read_requirements("base"),
    extras_require={
        "ros": read_requirements("ros"),
        "hawq": read_requirements("hawq"),
        "test": read_requirements("test"),
    },
    python_requires=">=3.10",
    zip_safe=True,
    maintainer="surfel_perception maintainers",
    maintainer_email="maintainers@surfel-perception.invalid",
    description="Dense surfel mapping and quantized neural perception for ROS 2 on the CPU.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "surfel-map = surfel_mapping_node.cli:main",
            "surfel_mapping_node = surfel_mapping_node.node:main",
            "hawq-quantize = quantized_inference_node.hawq.cli:main",
            "quantized_inference_node = quantized_inference_node.node:main",
        ],
    },
)
