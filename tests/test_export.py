"""Encoder export: loading without supcon_tf, and experiments.embed."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import export, models
from supcon_tf.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (8, 8, 3)

# Loads each export with TensorFlow and NumPy only, runs both signatures
# and saves what they return. A None entry in sys.modules makes any import
# of supcon_tf raise ImportError.
LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["supcon_tf"] = None
    import numpy as np
    import tensorflow as tf

    inputs = np.load("inputs.npz")
    outputs, specs = {}, {}
    for name in sys.argv[1:]:
        loaded = tf.saved_model.load(name)
        for signature, key in (("serving_default", "uint8"),
                               ("embed_float", "float")):
            function = loaded.signatures[signature]
            spec = function.structured_input_signature[1]["images"]
            shape = spec.shape.as_list()
            specs[f"{name}/{signature}"] = [spec.dtype.name, shape]
            result = function(images=tf.constant(inputs[key]))
            outputs[f"{name}/{key}"] = result["embeddings"].numpy()
    np.savez("outputs.npz", **outputs)
    print(json.dumps({"specs": specs}))
    """
)


def _build_encoder(strategy, seed):
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        encoder = models.build_encoder(
            "small_cnn",
            image_shape=IMAGE_SHAPE,
            channel_mean=[0.3, 0.5, 0.7],
            channel_std=[0.2, 0.3, 0.25],
        )
        # Moving statistics away from (0, 1), so inference mode matters.
        encoder.set_weights(
            [
                w + 0.5 if name.endswith("moving_variance") else w + 0.05
                for w, name in zip(
                    encoder.get_weights(),
                    [v.path for v in encoder.weights],
                    strict=True,
                )
            ]
        )
    return encoder


def _normalised(encoder, images):
    embeddings = encoder(images, training=False).numpy()
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def _run(command, cwd):
    return subprocess.run(
        [sys.executable, *command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def test_export_loads_without_supcon_tf(tmp_path, mirrored):
    plain = _build_encoder(tf.distribute.get_strategy(), seed=1)
    replicated = _build_encoder(mirrored(2), seed=2)
    export.export_encoder(plain, str(tmp_path / "plain"), image_shape=(8, 8, 3))
    export.export_encoder(
        replicated, str(tmp_path / "mirrored"), image_shape=IMAGE_SHAPE
    )
    rng = np.random.default_rng(0)
    uint8_images = rng.integers(0, 256, (5, *IMAGE_SHAPE), np.uint8)
    float_images = rng.uniform(0, 1, (3, *IMAGE_SHAPE)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", uint8=uint8_images, float=float_images)
    (tmp_path / "loader.py").write_text(LOADER)

    process = _run(["loader.py", "plain", "mirrored"], tmp_path)

    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    for name in ("plain", "mirrored"):
        specs = report["specs"]
        assert specs[f"{name}/serving_default"] == ["uint8", [None, 8, 8, 3]]
        assert specs[f"{name}/embed_float"] == ["float32", [None, 8, 8, 3]]
    outputs = np.load(tmp_path / "outputs.npz")
    for name, encoder in (("plain", plain), ("mirrored", replicated)):
        expected = _normalised(encoder, uint8_images / 255.0)
        np.testing.assert_allclose(
            outputs[f"{name}/uint8"], expected, atol=1e-5
        )
        expected = _normalised(encoder, float_images)
        np.testing.assert_allclose(
            outputs[f"{name}/float"], expected, atol=1e-5
        )
    assert not np.allclose(outputs["plain/uint8"], outputs["mirrored/uint8"])


def test_export_rejects_bad_shape_and_reuse(tmp_path):
    encoder = _build_encoder(tf.distribute.get_strategy(), seed=1)
    with pytest.raises(UsageError, match=r"image_shape=\(8, 8\) is invalid"):
        export.export_encoder(encoder, str(tmp_path / "a"), image_shape=(8, 8))
    export.export_encoder(encoder, str(tmp_path / "b"), image_shape=IMAGE_SHAPE)
    with pytest.raises(UsageError, match="already contains a SavedModel"):
        export.export_encoder(
            encoder, str(tmp_path / "b"), image_shape=IMAGE_SHAPE
        )


def test_load_exported_encoder_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        export.load_exported_encoder(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="contains no SavedModel"):
        export.load_exported_encoder(str(tmp_path))

    module = tf.Module()
    module.double = tf.function(
        lambda x: {"y": 2 * x},
        input_signature=[tf.TensorSpec([None], tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path / "other"))
    with pytest.raises(UsageError, match="no serving_default signature"):
        export.load_exported_encoder(str(tmp_path / "other"))


def _write_image_folder(root):
    """Write train/ and test/ folders of PNGs and return the test images."""
    rng = np.random.default_rng(4)
    test_images, test_labels = [], []
    for split, count in (("train", 2), ("test", 3)):
        for label, name in enumerate(("cat", "dog")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for index in range(count):
                image = rng.integers(0, 256, IMAGE_SHAPE, np.uint8)
                png = tf.io.encode_png(image).numpy()
                with open(os.path.join(folder, f"{index}.png"), "wb") as f:
                    f.write(png)
                if split == "test":
                    test_images.append(image)
                    test_labels.append(label)
    return np.stack(test_images), np.array(test_labels)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    encoder = _build_encoder(tf.distribute.get_strategy(), seed=3)
    export_dir = str(root / "export")
    export.export_encoder(encoder, export_dir, image_shape=IMAGE_SHAPE)
    data_dir = str(root / "images")
    images, labels = _write_image_folder(data_dir)
    return encoder, export_dir, data_dir, images, labels


def test_embed_writes_npz(exported, tmp_path):
    encoder, export_dir, data_dir, images, labels = exported
    output = str(tmp_path / "test.npz")

    process = _run(
        [
            "-m", "experiments.embed", f"--export_dir={export_dir}",
            "--dataset=folder", f"--data_dir={data_dir}", "--split=test",
            f"--output={output}", "--max_examples=5", "--batch_size=2",
        ],
        REPO,
    )  # fmt: skip

    assert process.returncode == 0, process.stderr[-3000:]
    result = np.load(output)
    assert result["embeddings"].shape == (5, 32)
    assert result["embeddings"].dtype == np.float32
    assert result["labels"].dtype == np.int64
    assert result["class_names"].tolist() == ["cat", "dog"]
    # Match each row to the one of the 6 test images with its embedding.
    expected = _normalised(encoder, images / 255.0)
    distances = np.linalg.norm(
        result["embeddings"][:, None] - expected[None], axis=2
    )
    matches = distances.argmin(axis=1)
    assert distances.min(axis=1).max() < 1e-5
    # A subset keeps the folder order: class, then file name.
    assert np.all(np.diff(matches) > 0)
    np.testing.assert_array_equal(result["labels"], labels[matches])


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_export", "--export_dir=.*not found"),
        ("missing_data", "--data_dir=.*no_images not found"),
    ],
)
def test_embed_usage_errors(exported, tmp_path, case, message):
    _, export_dir, data_dir, _, _ = exported
    if case == "missing_export":
        export_dir = str(tmp_path / "no_export")
    else:
        data_dir = str(tmp_path / "no_images")

    process = _run(
        [
            "-m", "experiments.embed", f"--export_dir={export_dir}",
            "--dataset=folder", f"--data_dir={data_dir}",
            f"--output={tmp_path / 'out.npz'}",
        ],
        REPO,
    )  # fmt: skip

    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    error_lines = [
        line
        for line in process.stderr.splitlines()
        if line.startswith("error:")
    ]
    assert len(error_lines) == 1
    assert re.search(message, error_lines[0])
    assert not os.path.exists(tmp_path / "out.npz")
