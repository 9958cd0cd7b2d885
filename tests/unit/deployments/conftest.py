"""The pipeline tests' small registry and images serve the flow tests too."""

from tests.unit.models.test_pipeline import images, registry  # noqa: F401
