"""Offline push: tells a tenant's backend about messages its offline users missed.

Runs after a batch is stored. For each new message it finds the members that
are not the sender and have no live connection on any gateway (presence in
the cache), and hands one ``message.offline`` event per message to the
webhook sender, which delivers it in the background. Push is best effort: a
slow or failing webhook never holds up the message pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from imhub.runtime import errors, models, ports, tenants

__all__ = ["OfflinePush"]

logger = logging.getLogger(__name__)


class OfflinePush:
    def __init__(
        self,
        *,
        registry: tenants.TenantRegistry,
        cache: ports.Cache,
        sender: ports.WebhookSender,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._sender = sender

    async def offline(
        self,
        tenant_id: str,
        messages: Sequence[models.Message],
        members: Mapping[str, set[str]],
    ) -> None:
        tenant = self._registry.get(tenant_id)
        if tenant is None or not tenant.webhook_url:
            return
        online: dict[str, bool] = {}
        for msg in messages:
            recipients = []
            for user_id in sorted(members.get(msg.conv_id, ())):
                if user_id == msg.sender_id:
                    continue
                if user_id not in online:
                    try:
                        online[user_id] = bool(
                            await self._cache.online_instances(tenant_id, user_id)
                        )
                    except errors.ImhubError:
                        online[user_id] = True  # unknown: do not spam the backend
                if not online[user_id]:
                    recipients.append(user_id)
            if not recipients:
                continue
            self._sender.submit(
                tenant.webhook_url,
                tenant.webhook_secret,
                {
                    "event": "message.offline",
                    "tenant_id": tenant_id,
                    "conv_id": msg.conv_id,
                    "msg_id": msg.msg_id,
                    "seq": msg.seq,
                    "sender_id": msg.sender_id,
                    "type": msg.type,
                    "created_at": msg.created_at.isoformat(),
                    "recipients": recipients,
                },
            )
