"""The pipeline tests' small real registry and images, for the naive server's tests."""

from tests.unit.models.test_pipeline import images, registry  # noqa: F401 - fixtures
