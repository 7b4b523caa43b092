"""The chat template our vLLM deployments use for image prompts.

Rendered from the checkpoint's own special-token strings so that a user message
[image, "Describe the image."] becomes exactly the reference encoder's image prompt.
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATE_FILE", "render_chat_template"]

CHAT_TEMPLATE_FILE = "jv4_chat_template.jinja"


def render_chat_template(tokens: dict[str, str]) -> str:
    """Chat template giving `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, never a generation prompt."""
    image = tokens["vision_start"] + tokens["image_pad"] + tokens["vision_end"]
    return (
        "{%- for message in messages -%}\n"
        f"{{{{ '{tokens['im_start']}' + message['role'] + '\\n' }}}}\n"
        "{%- if message['content'] is string -%}\n"
        "{{ message['content'] }}\n"
        "{%- else -%}\n"
        "{%- for part in message['content'] -%}\n"
        "{%- if part['type'] in ('image', 'image_url', 'input_image') -%}\n"
        f"{{{{ '{image}' }}}}\n"
        "{%- elif part['type'] in ('text', 'input_text') -%}\n"
        "{{ part['text'] }}\n"
        "{%- else -%}\n"
        "{{ raise_exception('unsupported content part: ' ~ part['type']) }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- endif -%}\n"
        f"{{{{ '{tokens['im_end']}' + '\\n' }}}}\n"
        "{%- endfor -%}\n"
    )
