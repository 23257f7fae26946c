"""The web demo: upload a PNG, JPEG or DICOM image, chat about it, watch the answer stream in.

Answers come from the same batching worker as the API server, so several people using the demo
at once share batches. The image shown beside the chat is what the model sees (a DICOM file after
windowing). Gradio's analytics are off and it is never shared through Gradio's tunnel.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # must precede the gradio import

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from medvl import RESEARCH_ONLY  # noqa: E402
from medvl.imaging import read_image  # noqa: E402
from medvl.model.build import VLM  # noqa: E402
from medvl.model.decode import Conversation  # noqa: E402
from medvl.serve.batcher import Batcher, QueueFull, Sampling  # noqa: E402
from medvl.serve.limits import PromptCounter  # noqa: E402

# System fonts only: the default theme would ask Google Fonts, which an offline hospital network
# (and the test machine) cannot reach.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build(vlm: VLM, batcher: Batcher, max_new_tokens: int = 256) -> gr.Blocks:
    counter = PromptCounter(vlm)

    def new_image(path: str | None):
        """A new image starts a new conversation."""
        if path is None:
            return None, None, []
        try:
            image = read_image(path, vlm.preprocessing, size=vlm.model.config.vision_config.image_size)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return image, image, []

    async def answer(question: str, history: list[dict], image: Image.Image | None):
        question = question.strip()
        if not question:
            return
        # Rebuild the model's conversation from the visible one; the image goes with the first turn.
        messages: list[dict] = []
        for m in history:
            messages.append({"role": m["role"], "content": [{"type": "text", "text": _text(m["content"])}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        if image is not None:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"].insert(0, {"type": "image"})
        conversation = Conversation(messages, [image] if image is not None else [])
        room = counter.context - counter.count(conversation)
        if room < 1:
            raise gr.Error("The conversation is longer than the model's context: clear it to start again.")
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield history, ""
        try:
            job = batcher.submit(conversation, Sampling(max_tokens=min(max_new_tokens, room)), stream=True)
        except QueueFull:
            raise gr.Error("The server is busy; try again in a moment.") from None
        async for kind, payload in job.results():
            if kind == "error":
                raise gr.Error(str(payload))
            if kind == "delta":
                history[-1]["content"] += payload
                yield history, ""
        if not history[-1]["content"]:
            history[-1]["content"] = "(empty answer)"
            yield history, ""

    with gr.Blocks(title="medvl", analytics_enabled=False) as demo:
        gr.Markdown(f"# medvl demo\n**{RESEARCH_ONLY}**", elem_id="research-note")
        image_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image (PNG, JPEG or DICOM)",
                    file_types=["image", ".dcm", ".dicom"],
                    type="filepath",
                    elem_id="upload",
                )
                preview = gr.Image(
                    label="What the model sees",
                    interactive=False,
                    elem_id="preview",
                    buttons=["download", "fullscreen"],
                )
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(
                    label="Chat",
                    elem_id="chat",
                    render_markdown=False,
                    height=420,
                    buttons=["copy", "copy_all"],
                )
                question = gr.Textbox(
                    placeholder="Ask about the image and press Enter", show_label=False, elem_id="question"
                )
                clear = gr.Button("Clear chat")
        upload.change(new_image, upload, [image_state, preview, chatbot])
        question.submit(answer, [question, chatbot, image_state], [chatbot, question])
        clear.click(lambda: [], None, chatbot)
    return demo


def _text(content: str | list) -> str:
    """A chat message's text: Gradio hands content back as a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def launch(
    vlm: VLM, host: str = "127.0.0.1", port: int | None = None, max_new_tokens: int = 256
) -> gr.Blocks:
    """Start the demo without blocking (the caller blocks or stops it: `demo.close()`)."""
    batcher = Batcher(vlm)
    batcher.start()
    demo = build(vlm, batcher, max_new_tokens)
    demo.queue(default_concurrency_limit=16)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        theme=THEME,
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
    )
    return demo
