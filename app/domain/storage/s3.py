"""S3-compatible backend (AWS S3, MinIO, Ceph RGW, …) with boto3.

A single PUT is atomic in S3: readers see the old or the new object. Credentials come from boto3's usual
chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, instance roles, …); the endpoint, bucket, key prefix and
region from `Settings` (`SSTMERGE_S3_*`). Uploads above boto3's multipart threshold are completed as one
object only when every part is in, so they are atomic too.
"""

from __future__ import annotations

import builtins
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from .base import Storage, StorageError, check_key


class S3Storage(Storage):
    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _errors(self) -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    def put_file(self, key: str, source: Path) -> None:
        try:
            self.client.upload_file(str(source), self.bucket, self._key(key))
        except self._errors() as exc:
            raise StorageError(f"cannot write s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def get_file(self, key: str, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, destination)
        except self._errors() as exc:
            raise StorageError(f"cannot read s3://{self.bucket}/{self._key(key)}: {exc}") from exc
        finally:
            Path(tmp).unlink(missing_ok=True)

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self._errors() as exc:
            raise StorageError(f"cannot read s3://{self.bucket}/{self._key(key)}: {exc}") from exc
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(str(exc)) from exc

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except self._errors() as exc:
            raise StorageError(str(exc)) from exc
        return sorted(keys)

    def children(self, prefix: str) -> builtins.list[str]:
        full = self._key(prefix) + "/"
        names: set[str] = set()
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for page in pages:
                names.update(item["Prefix"][len(full) :].rstrip("/") for item in page.get("CommonPrefixes", []))
                names.update(item["Key"][len(full) :] for item in page.get("Contents", []))
        except self._errors() as exc:
            raise StorageError(str(exc)) from exc
        return sorted(names)

    def newest(self, prefix: str) -> datetime | None:
        newest = None
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix) + "/"
            ):
                for item in page.get("Contents", []):
                    newest = item["LastModified"] if newest is None else max(newest, item["LastModified"])
        except self._errors() as exc:
            raise StorageError(str(exc)) from exc
        return newest

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except self._errors() as exc:
                raise StorageError(f"cannot delete under s3://{self.bucket}/{self._key(prefix)}: {exc}") from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors() as exc:
            raise StorageError(f"bucket {self.bucket} is not reachable: {exc}") from exc
