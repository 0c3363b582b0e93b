"""moto's server (`moto_server`) with two faults of its SQS emulation fixed for concurrent clients.

Usage: python3 moto_server.py -H 127.0.0.1 -p 4566   (the arguments of moto_server)

1. Races: the threaded server changes a queue's message list from several threads without a
   lock, so a send racing a delete can lose the message, two deletes can bring a deleted one
   back, and two receives can take the same message. Here every queue operation holds that
   queue's own lock (released while a long poll waits). FIFO receives are left alone: they
   spin while a message group is in flight, and must not hold the lock meanwhile.
2. Cost: every sent or received message re-counted the whole queue (for attributes it did not
   need), and every delete copied it, so a queue thousands deep answered in seconds. Those
   counts are skipped there, and a delete removes its one message in place.
3. Clock: every receive lists the queue's visible messages, reading the clock twice per message
   through datetime arithmetic (~8 µs): 80 ms a receive on a queue 10,000 deep, with the queue
   locked, so the whole server moved ~120 messages a second. Here the clock is read once per
   listing, and moto's SQS clock reads are `time.time()` (the same instant, without datetime).
4. Log: werkzeug logged a line per request (an eighth of the server's time under load, and a
   log that only grows); here it logs warnings and errors only.

Everything else is moto as installed.
"""

import functools
import logging
import sys
import threading
import time

from moto.core.utils import unix_time
from moto.server import main
from moto.sqs import models
from moto.sqs.exceptions import ReceiptHandleIsInvalid


def holding_queue_lock(method):
    @functools.wraps(method)
    def locked(queue, *args, **kwargs):
        with queue._messages_lock:
            return method(queue, *args, **kwargs)

    return locked


def holding_lock_of_named_queue(method, fifo=True):
    @functools.wraps(method)
    def locked(backend, queue_name, *args, **kwargs):
        queue = backend.get_queue(queue_name)
        if queue.fifo_queue and not fifo:
            return method(backend, queue_name, *args, **kwargs)
        with queue._messages_lock:
            return method(backend, queue_name, *args, **kwargs)

    return locked


def delete_message(queue, receipt_handle):
    """moto's delete (any receipt handle the message ever had), without copying the queue."""
    if receipt_handle in queue.deleted_messages:
        return
    for index, message in enumerate(queue._messages):
        if message.receipt_handle == receipt_handle or receipt_handle in message._old_receipt_handles:
            queue.pending_messages.discard(message)
            queue.deleted_messages.update(message.all_receipt_handles)
            del queue._messages[index]
            return
    raise ReceiptHandleIsInvalid()


models.Queue.add_message = holding_queue_lock(models.Queue.add_message)
models.Queue.delete_message = holding_queue_lock(delete_message)
models.SQSBackend.change_message_visibility = holding_lock_of_named_queue(
    models.SQSBackend.change_message_visibility
)
models.SQSBackend.receive_message = holding_lock_of_named_queue(
    models.SQSBackend.receive_message, fifo=False
)

sending = threading.local()


def uncounted_while_sending(count):
    def counted(queue):
        return 0 if getattr(sending, "active", False) else count(queue)

    return property(counted)


for name in (
    "approximate_number_of_messages",
    "approximate_number_of_messages_delayed",
    "approximate_number_of_messages_not_visible",
):
    setattr(models.Queue, name, uncounted_while_sending(getattr(models.Queue, name).fget))


def flagged_as_sending(method):
    @functools.wraps(method)
    def send(*args, **kwargs):
        sending.active = True
        try:
            return method(*args, **kwargs)
        finally:
            sending.active = False

    return send


models.SQSBackend.send_message = flagged_as_sending(models.SQSBackend.send_message)


def retained(backend, queue_name, message):
    retention = int(backend.get_queue(queue_name).message_retention_period)
    return retention + message.sent_timestamp / 1000 > unix_time()


models.SQSBackend.is_message_valid_based_on_retention_period = retained


def unix_time(dt=None):
    return time.time() if dt is None else original_unix_time(dt)


def unix_time_millis(dt=None):
    return unix_time(dt) * 1000.0


original_unix_time = models.unix_time
models.unix_time = unix_time
models.unix_time_millis = unix_time_millis


def visible_messages(queue):
    """moto's `Queue.messages` (visible and not delayed), with one clock read per listing."""
    now = unix_time_millis()
    return [m for m in queue._messages if now > m.visible_at and now >= m.delayed_until]


models.Queue.messages = property(visible_messages)

# werkzeug sets INFO only on a logger whose level is unset.
logging.getLogger("werkzeug").setLevel(logging.WARNING)

if __name__ == "__main__":
    main(sys.argv[1:])
