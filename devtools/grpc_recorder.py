"""A loopback gRPC proxy in front of a plaintext gRPC server (the emulator's Storage Read API): it records every call
(method and serialized request), can delay each call and each response stream (a model of a far-away API's round
trip), and can refuse chosen calls with a status (a model of what the real service answers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

# (method, serialized request) -> None (forward it) or (status code, details) to refuse it
Refuse = Callable[[str, bytes], tuple[grpc.StatusCode, str] | None]
_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class GrpcRecordingProxy:
    def __init__(self, upstream: str, delay: float = 0.0, refuse: Refuse | None = None) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.delay, self.refuse = delay, refuse
        self._channel = grpc.insecure_channel(upstream, options=_OPTIONS)
        self._server = grpc.server(ThreadPoolExecutor(32, thread_name_prefix="grpc-proxy"), options=_OPTIONS)
        self._server.add_generic_rpc_handlers([_Forward(self)])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"127.0.0.1:{port}"

    def requests(self, method_suffix: str, message_type: Any) -> list[Any]:
        """The calls to the method ending with `method_suffix`, parsed as `message_type` (a proto-plus class)."""
        return [message_type.deserialize(body) for method, body in self.calls if method.endswith(method_suffix)]

    def close(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcRecordingProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method, proxy = details.method, self.proxy
        # routing headers (x-goog-request-params) go on; transport headers are the channel's own
        metadata = [(k, v) for k, v in details.invocation_metadata if k.startswith("x-goog")]

        def admit(request: bytes, context: grpc.ServicerContext) -> None:
            proxy.calls.append((method, request))
            if proxy.delay:
                time.sleep(proxy.delay)
            refusal = proxy.refuse(method, request) if proxy.refuse else None
            if refusal is not None:
                context.abort(*refusal)

        if method.endswith("/ReadRows"):  # server streaming

            def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                admit(request, context)
                try:
                    yield from proxy._channel.unary_stream(method)(request, metadata=metadata)
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details())

            return grpc.unary_stream_rpc_method_handler(stream)

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            admit(request, context)
            try:
                return proxy._channel.unary_unary(method)(request, metadata=metadata)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())
                raise

        return grpc.unary_unary_rpc_method_handler(unary)
