"""What each stage is given: the batch the model's own preprocessing makes."""

import torch

from models.inspection.compute import batched_inputs
from models.stages import DETECTOR, load_stage


def test_a_batch_holds_each_image_as_its_own_transform_makes_it(registry, images):
    model = load_stage(registry, "sure", DETECTOR).model
    mixed = [*images, images[0].convert("L")]  # a grayscale camera beside colour ones
    batch = batched_inputs(model, mixed)
    transform = model.preprocessing.transform()
    one_by_one = torch.stack([transform(image) for image in mixed])
    assert batch.shape == one_by_one.shape and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(batch, one_by_one, rtol=0, atol=1e-6)
    assert not torch.equal(batch[0], batch[1])  # the images differ, so the check is real
