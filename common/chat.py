"""The chat formats: evaluation (generate.py --style chat / code), calibration traces and recovery targets share
them. Math: the neuron paper's E.1 instruction after the question; code: its E.2 instruction before the HumanEval
stub (the paper gives the instruction, not where it goes; we put it first, as a system prompt would be)."""

from common.cli import CotpruneError


CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (  # task-specific neuron pruning, Appendix E.2, verbatim (its curly quotes made straight)
    "You are generating solutions for the HumanEval benchmark. Output ONLY valid Python code. Output ONLY the "
    "function definition requested. Do NOT include explanations, comments outside the function, examples, tests, "
    "prints, or prose. Do NOT include markdown, backticks, or formatting. Do NOT add helper text before or after the "
    "code. The output must consist of one or more top-level def functions only. No top-level statements other than "
    "function definitions. No if __name__ == \"__main__\" blocks. No print statements. No test cases. No "
    "explanations. Respond with Python code ONLY.")


def chat_prompt(tokenizer, question, task="math"):
    """(text, token ids) of a question in the model's chat template with the task's instruction.

    One format for evaluation (generate.py --style chat / code), calibration traces and recovery data.
    """
    if not tokenizer.chat_template:
        raise CotpruneError("the chat format needs a tokenizer with a chat template; this model has none")
    text = tokenizer.apply_chat_template(chat_messages(question, task=task), add_generation_prompt=True,
                                         tokenize=False)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_messages(question, answer=None, task="math"):
    """The conversation of chat_prompt, with the assistant's answer appended when given (recovery targets)."""
    content = f"{CODE_INSTRUCTION}\n\n{question}" if task == "code" else f"{question}\n{CHAT_INSTRUCTION}"
    messages = [{"role": "user", "content": content}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])
