"""Call a UPI_V1 model endpoint through the gateway's gRPC port, with plain grpcio.

    python examples/upi/call.py [--target 127.0.0.1:8082] [--authority rows.fraud.localhost]

The gateway picks the model endpoint by the call's ``:authority`` (gRPC sends the target
by default; ``grpc.default_authority`` sets a model's host name while connecting to an
address). Prints the version that answered and the result table.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from merlin_dp.protos.caraml.upi.v1 import table_pb2, type_pb2, upi_pb2, upi_pb2_grpc


def request() -> upi_pb2.PredictValuesRequest:
    """Two rows of three columns: a DOUBLE, an INTEGER and a STRING."""
    table = table_pb2.Table(
        name="rows",
        columns=[
            table_pb2.Column(name="a", type=type_pb2.TYPE_DOUBLE),
            table_pb2.Column(name="b", type=type_pb2.TYPE_INTEGER),
            table_pb2.Column(name="city", type=type_pb2.TYPE_STRING),
        ],
        rows=[
            table_pb2.Row(
                row_id="r1",
                values=[
                    table_pb2.Value(double_value=1.5),
                    table_pb2.Value(integer_value=2),
                    table_pb2.Value(string_value="jakarta"),
                ],
            ),
            table_pb2.Row(
                row_id="r2",
                values=[
                    table_pb2.Value(is_null=True),
                    table_pb2.Value(integer_value=7),
                    table_pb2.Value(string_value="bandung"),
                ],
            ),
        ],
    )
    return upi_pb2.PredictValuesRequest(
        prediction_table=table, metadata=upi_pb2.RequestMetadata(prediction_id="example-1")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:8082", help="the gateway's gRPC port")
    parser.add_argument("--authority", default="rows.fraud.localhost", help="the model's host")
    args = parser.parse_args(argv)
    options = [("grpc.default_authority", args.authority)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = upi_pb2_grpc.UniversalPredictionServiceStub(channel)
        try:
            response, call = stub.PredictValues.with_call(request(), timeout=5.0)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    version = dict(call.initial_metadata()).get("x-model-version", "?")
    result = response.prediction_result_table
    print(f"answered by version {version}")
    for row in result.rows:
        print(row.row_id, [value.double_value for value in row.values])
    return 0


if __name__ == "__main__":
    sys.exit(main())
