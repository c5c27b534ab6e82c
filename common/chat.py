"""The one chat format: evaluation (generate.py --style chat), calibration traces and recovery targets share it."""

from common.cli import CotpruneError


CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def chat_prompt(tokenizer, question):
    """(text, token ids) of a question in the model's chat template with the step-by-step instruction.

    One format for evaluation (generate.py --style chat), calibration traces and recovery data.
    """
    if not tokenizer.chat_template:
        raise CotpruneError("the chat format needs a tokenizer with a chat template; this model has none")
    text = tokenizer.apply_chat_template(chat_messages(question), add_generation_prompt=True, tokenize=False)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_messages(question, answer=None):
    """The conversation of chat_prompt, with the assistant's answer appended when given (recovery targets)."""
    messages = [{"role": "user", "content": f"{question}\n{CHAT_INSTRUCTION}"}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])
