"""Celery configured from app.config: Redis when REDIS_URL is set, else a file-system broker."""

from __future__ import annotations

from celery import Celery

from app.config import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("pgsage", broker=settings.broker_url, include=["workers.tasks.ingest", "workers.tasks.reindex"])
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue_name,
        "worker_hijack_root_logger": False,
        # A pool process loads the embedding model in worker_process_init before it reports up; Celery's
        # default 4 s wait for that report killed every replacement process (after a crash or a time
        # limit) on a busy machine, so the pool never recovered.
        "worker_proc_alive_timeout": 300.0,
        # A batch that runs past this is stopped and its process replaced; its documents are sent again
        # when their claim goes stale, and one that keeps hitting the limit fails alone.
        "task_annotations": {"ingest.process_documents": {"time_limit": settings.ingest_task_time_limit}},
        "beat_schedule": {
            # Documents whose task was lost (a broker restart, a failed enqueue) or whose worker died
            # (a crash, a kill, the time limit) are sent again.
            "requeue-stalled-documents": {
                "task": "ingest.requeue_stalled",
                "schedule": float(max(5, min(60, settings.ingest_lease_seconds // 3))),
            },
            # Model changes are noticed at start; this also resumes a stalled re-index and retires old spaces.
            "check-embedding-model": {"task": "reindex.check", "schedule": settings.reindex_check_seconds},
        },
    }
    if settings.redis_url is None:
        queue = settings.broker_dir
        (queue / "in").mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(queue / "in"),
            "data_folder_out": str(queue / "in"),
            "store_processed": False,
            "control_folder": str(queue / "control"),
        }
    else:
        # Unacked tasks come back after this long if a worker dies holding them.
        conf["broker_transport_options"] = {"visibility_timeout": 3600}
    app.conf.update(conf)
    return app


celery_app = make_celery(get_settings())
