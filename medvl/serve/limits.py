"""What the server and the web demo check before a request reaches the model's queue."""

from __future__ import annotations

import copy
import threading

from medvl.model.build import VLM
from medvl.model.decode import Conversation


class PromptCounter:
    """Prompt length before queueing, to refuse over-long requests with a 400. Uses its own copy of
    the tokenizer under a lock: the worker's tokenizer changes its padding state while it runs."""

    def __init__(self, vlm: VLM) -> None:
        self.processor = copy.deepcopy(vlm.processor)
        self.image_tokens = vlm.model.config.image_seq_length
        self.context = vlm.model.config.text_config.max_position_embeddings
        self._lock = threading.Lock()

    def count(self, conversation: Conversation) -> int:
        with self._lock:
            prompt = self.processor.apply_chat_template(conversation.messages, add_generation_prompt=True)
            n = len(self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return n + len(conversation.images) * (self.image_tokens - 1)  # each <image> expands
