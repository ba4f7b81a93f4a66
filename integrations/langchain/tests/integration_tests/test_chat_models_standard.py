"""LangChain's standard integration tests for ChatBelleVL, on the tiny random checkpoint.

The capability flags say what ChatBelleVL does. A random model writes noise, but forced tool calls and structured
output are generated under a grammar, so those standard tests pass even here; the tests that need a sensible answer
(the right tool with the right argument values) are strict xfails with the reason, so one that starts passing is
noticed. The mechanics behind them (rendering, parsing, tool_call_chunks, invalid_tool_calls) are covered by this
package's own tests with scripted model output.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from ..standard_params import ChatBelleVLFlags
from .conftest import SHARED

RANDOM_MODEL = "the tiny test checkpoint has random weights: its call is well-formed, but not the asked-for values"


class TestChatBelleVLStandard(ChatBelleVLFlags, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": SHARED["model"], "max_tokens": 32, "temperature": 0}

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}  # the answer is the JSON itself: the fewest tokens

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(reason=RANDOM_MODEL, strict=True)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=RANDOM_MODEL, strict=True)
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=RANDOM_MODEL, strict=True)
    def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(reason=RANDOM_MODEL, strict=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=RANDOM_MODEL, strict=True)
    def test_unicode_tool_call_integration(
        self, model: BaseChatModel, *, tool_choice: str | None = None, force_tool_call: bool = True
    ) -> None:
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)
