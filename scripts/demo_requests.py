"""What scripts/demo.sh sends: one text and one image request through the openai SDK."""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
from openai import OpenAI
from PIL import Image


def demo_image() -> str:
    y, x = np.mgrid[0:224, 0:224]
    pixels = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def main(url: str) -> int:
    client = OpenAI(base_url=f"{url}/v1", api_key="demo")
    text = client.embeddings.create(model="jina-embeddings-v4", input=["A cat sleeps on the windowsill."],
                                    extra_body={"task": "retrieval.query"})
    vector = np.array(text.data[0].embedding)
    print(f"text  -> {vector.shape[0]}-d vector, norm {np.linalg.norm(vector):.4f}, "
          f"first values {np.round(vector[:4], 4).tolist()}, {text.usage.prompt_tokens} tokens")
    # Jina-style input objects pass straight through the SDK.
    image = client.embeddings.create(model="jina-embeddings-v4", input=[{"image": demo_image()}],  # type: ignore[list-item]
                                     extra_body={"task": "retrieval.passage"})
    image_vector = np.array(image.data[0].embedding)
    print(f"image -> {image_vector.shape[0]}-d vector, cosine to the text {float(vector @ image_vector):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"))
