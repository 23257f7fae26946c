"""The web demo: upload a PNG, JPEG or DICOM image, or a scan (NIfTI, a zipped DICOM series), chat
about it, watch the answer stream in.

Answers come from the same batching worker as the API server, so several people using the demo
at once share batches. The image shown beside the chat is what the model sees (a DICOM file after
windowing). A scan is read as the server reads one (`ScanReader`: the model's volume spec and token
budget) and given to the model as its K slabs; three of them (the first, middle and last) are shown.
Gradio's analytics are off and it is never shared through Gradio's tunnel.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # must precede the gradio import

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from medvl import RESEARCH_ONLY  # noqa: E402
from medvl.imaging import is_scan, read_image  # noqa: E402
from medvl.imaging.slabs import MAX_SCAN_VOXELS  # noqa: E402
from medvl.model.build import VLM  # noqa: E402
from medvl.model.decode import Conversation  # noqa: E402
from medvl.serve.api import ScanReader, ServeSettings  # noqa: E402
from medvl.serve.batcher import Batcher, QueueFull, Sampling  # noqa: E402
from medvl.serve.limits import PromptCounter  # noqa: E402

# System fonts only: the default theme would ask Google Fonts, which an offline hospital network
# (and the test machine) cannot reach.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
SHOWN_SLABS = 3  # thumbnails of a scan: its first, middle and last slab


def build(vlm: VLM, batcher: Batcher, scans: ScanReader, max_new_tokens: int = 256) -> gr.Blocks:
    counter = PromptCounter(vlm)

    def new_image(path: str | None):
        """A new image or scan starts a new conversation. Returns the images the model is given, the
        2D preview and the slab thumbnails (each shown only for its kind), and the emptied chat."""
        if path is None:
            return [], gr.Image(None, visible=True), gr.Gallery(None, visible=False), []
        try:
            if is_scan(path):
                slabs = scans.slabs(path)
                shown = gr.Gallery(thumbnails(slabs), visible=True)
                return scans.inputs(slabs), gr.Image(None, visible=False), shown, []
            image = read_image(path, vlm.preprocessing, size=vlm.model.config.vision_config.image_size)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return [image], gr.Image(image, visible=True), gr.Gallery(None, visible=False), []

    async def answer(question: str, history: list[dict], images: list | None):
        question = question.strip()
        if not question:
            return
        images = images or []
        # Rebuild the model's conversation from the visible one; the images go with the first turn
        # (a scan's slabs as one image part each, as the API gives them).
        messages: list[dict] = []
        for m in history:
            messages.append({"role": m["role"], "content": [{"type": "text", "text": _text(m["content"])}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"][:0] = [{"type": "image"}] * len(images)
        conversation = Conversation(messages, images)
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
        image_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image (PNG, JPEG or DICOM) or scan (NIfTI .nii / .nii.gz, DICOM series as .zip)",
                    file_types=["image", ".dcm", ".dicom", ".nii", ".gz", ".zip"],
                    type="filepath",
                    elem_id="upload",
                )
                preview = gr.Image(
                    label="What the model sees",
                    interactive=False,
                    elem_id="preview",
                    buttons=["download", "fullscreen"],
                )
                slabs = gr.Gallery(
                    label="What the model sees: slabs of the scan, inferior to superior",
                    visible=False,
                    interactive=False,
                    columns=SHOWN_SLABS,
                    format="png",
                    elem_id="slabs",
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
        upload.change(new_image, upload, [image_state, preview, slabs, chatbot])
        question.submit(answer, [question, chatbot, image_state], [chatbot, question])
        clear.click(lambda: [], None, chatbot)
    return demo


def thumbnails(slabs: list[Image.Image]) -> list[tuple[Image.Image, str]]:
    """The first, middle and last of a scan's K slabs (all of them when K <= 3), captioned."""
    k = len(slabs)
    shown = sorted({round(j * (k - 1) / (SHOWN_SLABS - 1)) for j in range(SHOWN_SLABS)})
    return [(slabs[i], f"slab {i + 1} of {k}") for i in shown]


def _text(content: str | list) -> str:
    """A chat message's text: Gradio hands content back as a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def launch(
    vlm: VLM,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_new_tokens: int = 256,
    volume_tokens: int | None = None,
    max_volume_bytes: int = ServeSettings.max_volume_bytes,
) -> gr.Blocks:
    """Start the demo without blocking (the caller blocks or stops it: `demo.close()`). Scans are read
    as `medvl serve` reads them: the model's volume spec, its token budget unless `volume_tokens` says
    otherwise, the server's default limits."""
    batcher = Batcher(vlm)
    batcher.start()
    scans = ScanReader.of(vlm, volume_tokens, max_volume_bytes, MAX_SCAN_VOXELS)
    demo = build(vlm, batcher, scans, max_new_tokens)
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
