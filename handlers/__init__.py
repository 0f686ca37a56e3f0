"""Handlers: one per input format, each mapping a raw record to the prompt/target segments of one sample.

    from packer.handlers import HandlerOptions, get_handler
    handle = get_handler("alpaca", HandlerOptions(template="chatml", map_keys={"output": "response"}))
    segments = handle({"instruction": "Hi", "response": "Hello!"})

Templates per handler: template_names("alpaca"), template_names("belle") (moss and text have none).
"""

from .base import HANDLERS, Handler, HandlerOptions, RecordError, get_handler, template_names

__all__ = ["HANDLERS", "Handler", "HandlerOptions", "RecordError", "get_handler", "template_names"]
