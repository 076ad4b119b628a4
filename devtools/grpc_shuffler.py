"""A loopback gRPC proxy in front of the emulator's Storage Read API that reads the way BigQuery is allowed to: the
emulator sends a session's rows in offset order, in one stream; BigQuery promises no order at all. The proxy reads each
session it opens in full, shuffles the rows (seeded), splits them across as many streams as the request allows
(`max_stream_count`, or 3 when the server may choose), cuts each stream into messages of uneven sizes, and serves
those, with the selected fields in the reverse of the order asked (BigQuery sends them in the table's order, which
need not be the order asked). An empty result is a session without streams, as BigQuery answers it. Every other
call is forwarded."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pyarrow as pa
from google.cloud.bigquery_storage_v1 import types

_SERVICE = "/google.cloud.bigquery.storage.v1.BigQueryRead/"
_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
FREE_STREAMS = 3  # streams served when the request leaves the count to the server


class ShufflingReadProxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._streams: dict[str, list[pa.RecordBatch]] = {}
        self._channel = grpc.insecure_channel(upstream, options=_OPTIONS)
        self._server = grpc.server(ThreadPoolExecutor(32, thread_name_prefix="grpc-shuffler"), options=_OPTIONS)
        self._server.add_generic_rpc_handlers([_Handler(self)])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"127.0.0.1:{port}"
        self.sessions = 0  # sessions served shuffled, for a test to see the proxy was in the path

    def close(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()

    def create_session(self, body: bytes, metadata: list[tuple[str, str]]) -> bytes:
        request = types.CreateReadSessionRequest.deserialize(body)
        reply = self._channel.unary_unary(_SERVICE + "CreateReadSession")(body, metadata=metadata)
        session = types.ReadSession.deserialize(reply)
        schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema))
        batches = [b for stream in session.streams for b in self._upstream_batches(stream.name, schema, metadata)]
        rows = pa.Table.from_batches(batches, schema=schema)
        rows = rows.select(list(reversed(rows.column_names)))
        session.arrow_schema = types.ArrowSchema(serialized_schema=rows.schema.serialize().to_pybytes())
        with self._lock:
            order = list(range(rows.num_rows))
            self._rng.shuffle(order)
            wanted = request.max_stream_count or FREE_STREAMS
            parts = self._split(order, min(wanted, len(order)))
            names = [f"{session.name}/streams/shuffled-{k}" for k in range(len(parts))]
            for name, part in zip(names, parts, strict=True):
                shuffled = rows.take(pa.array(part, pa.int64())) if part else rows.slice(0, 0)
                self._streams[name] = [
                    shuffled.slice(start, size).combine_chunks().to_batches()[0]
                    for start, size in self._messages(len(part))
                ]
            self.sessions += 1
        session.streams = [types.ReadStream(name=name) for name in names]
        return types.ReadSession.serialize(session)

    def read_rows(self, body: bytes) -> Iterator[bytes]:
        request = types.ReadRowsRequest.deserialize(body)
        with self._lock:
            batches = self._streams.get(request.read_stream)
        if batches is None:
            raise KeyError(request.read_stream)
        skip = request.offset
        for batch in batches:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch, skip = batch.slice(skip), 0
            message = types.ReadRowsResponse(
                arrow_record_batch=types.ArrowRecordBatch(
                    serialized_record_batch=batch.serialize().to_pybytes(), row_count=batch.num_rows
                ),
                row_count=batch.num_rows,
            )
            yield types.ReadRowsResponse.serialize(message)

    def _upstream_batches(
        self, name: str, schema: pa.Schema, metadata: list[tuple[str, str]]
    ) -> Iterator[pa.RecordBatch]:
        body = types.ReadRowsRequest.serialize(types.ReadRowsRequest(read_stream=name))
        for reply in self._channel.unary_stream(_SERVICE + "ReadRows")(body, metadata=metadata):
            message = types.ReadRowsResponse.deserialize(reply)
            yield pa.ipc.read_record_batch(pa.py_buffer(message.arrow_record_batch.serialized_record_batch), schema)

    def _split(self, order: list[int], streams: int) -> list[list[int]]:
        """`streams` parts of uneven length (none empty), or none for no rows."""
        if not order:
            return []
        cuts = sorted(self._rng.sample(range(1, len(order)), streams - 1)) if streams > 1 else []
        bounds = [0, *cuts, len(order)]
        return [order[a:b] for a, b in itertools.pairwise(bounds)]

    def _messages(self, rows: int) -> Iterator[tuple[int, int]]:
        """(start, size) of messages of uneven sizes, single rows among them, covering `rows`."""
        start = 0
        while start < rows:
            size = self._rng.choice([1, self._rng.randint(1, max(1, min(4096, rows // 2)))])
            yield start, min(size, rows - start)
            start += size


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: ShufflingReadProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method, proxy = details.method, self.proxy
        metadata = [(k, v) for k, v in details.invocation_metadata if k.startswith("x-goog")]

        def relay(call, context: grpc.ServicerContext):  # an upstream refusal goes back as it came
            try:
                return call()
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())
                raise

        if method == _SERVICE + "CreateReadSession":
            return grpc.unary_unary_rpc_method_handler(
                lambda body, context: relay(lambda: proxy.create_session(body, metadata), context)
            )
        if method == _SERVICE + "ReadRows":

            def stream(body: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                try:
                    yield from proxy.read_rows(body)
                except KeyError as exc:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"no such stream {exc}")

            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(
            lambda body, context: relay(lambda: proxy._channel.unary_unary(method)(body, metadata=metadata), context)
        )
