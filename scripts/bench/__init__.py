"""Load-test a real gateway process on loopback: throughput, latency, memory, pools, rules.

Driven by ``scripts/benchmark.sh``. Every scenario starts ``flux run`` as a child process on
a temporary config, with a private Mosquitto of its own on a free port (a fresh one per
scenario, so no session or queue of one scenario reaches the next), and is bounded in count
and time (``--timeout`` caps each wait).

Scenarios (``--only`` takes names or the issue's ids P1..P8, S1, S2, comma-separated, in
that order; ids that name the same run are run once). The broker is configured as flux's
embedded Mosquitto (``--broker stock``: Mosquitto's defaults):

- ``drain`` (P1, P3, P5): a QoS 1 backlog (``--messages`` from ``--publishers`` processes) is
  queued in the gateway's persistent session while the gateway is stopped (so the
  publishers' CPU does not compete), then the gateway starts and the time from the first to
  the last commit is measured. QoS 0 is refused: a broker does not queue QoS 0 messages for
  an offline session, so there would be no backlog.
- ``shipped`` (S1): the same drain through the shipped ``config.toml``, ``rules/`` and
  ``plugins/`` as they are (only broker, database, ports and module cache are the bench's),
  with a backlog from a fleet of ``--devices`` sensors (``tests.harness.FleetDevice``:
  temperatures drift slowly, humidity, battery in percent, ``charging = false``, the
  device's own ``ts``; about 1 message in 10 trips a shipped rule that alerts and
  publishes). Reports device messages/s, ``rows_per_s`` (events of every hop plus alerts,
  over the drain's seconds) and the rows of each table: ``dead_letters`` should be 0.
- ``storm`` (S2): ``shipped`` plus one rule that alerts and publishes (QoS 1) for every
  telemetry message; ``mosquitto_sub`` (QoS 1) counts the publishes, and the drain ends
  once every message is stored and every publish received.
- ``latency`` (P2): a paced QoS 1 stream (``--rate`` for ``--duration`` s); publish -> visible
  in the database per message, observed by polling every 2 ms (SQLite by rowid; PostgreSQL
  by the time-ordered event id, looking again just behind the newest id every 20 ms for
  rows committed out of id order, as by several workers: those are ``late_found``).
- ``http`` (P4): POST /api/v1/event from ``--http-concurrency`` keep-alive connections, then
  the batch endpoint with 100 events per request (connections spread over the workers).
- ``workers`` (P7): a live QoS 0 flood (``--messages`` as fast as ``--publishers`` processes
  can publish; QoS 0 whatever ``--qos`` says) against ``flux run`` with 1 worker, then with
  ``max(2, --workers)``, on one shared database. ``events_per_s`` is the stored-count growth
  while the flood lasts, with the publishers' own rate beside it (``publish_rate``: they
  share the machine's cores with the gateway, so on a small machine they may be the limit);
  what the broker buffered is committed afterwards (``catch_up_s``), and
  ``overall_events_per_s`` is all stored over the time to the last commit. The second row
  has both ratios to the first (``vs_1_worker``, ``overall_vs_1_worker``); ``lost`` counts
  QoS 0 messages never stored.
- P8: ``drain`` against PostgreSQL: ``--database-url`` if given, else
  postgresql+asyncpg://127.0.0.1:5432/test if it answers, else skipped with the reason.

PostgreSQL: ``--database-url`` names a server and a database to connect to; the bench
creates a scratch database ``flux_bench_<random>`` there, runs every scenario in it (they
TRUNCATE between runs) and drops it at the end, so the named database is never written.

``--workers N`` passes ``--workers N`` to ``flux run`` (N processes sharing one MQTT shared
subscription; worker i serves HTTP on the configured port + i). CPU seconds and peak RSS are
then summed over the gateway's process tree (the supervisor included; RSS as the sum of each
process's peak), and /metrics is summed over the workers.

Every result row carries, from /metrics at the end of the scenario: ``pool_hit_ratio`` =
plugin pool hits / (hits + misses), and the rule evaluation cost from the
``flux_rule_eval_seconds`` histogram: ``rule_eval_us_per_batch`` (sum / count: one batched
Lua call of all rules over a batch of events) and ``rule_eval_us_per_event`` (sum / events
evaluated, where events evaluated is the largest per-rule ``flux_rule_evaluations_total``:
every generated rule has the same topic filter), and ``rule_batch_events`` (events per
batch); from ``flux_db_query_duration_seconds{operation="write_batch"}`` and
``flux_db_batch_size``: ``store_commit_ms`` (mean time of one batch insert + commit) and
``store_batch_events`` (rows per committed batch). ``null`` where nothing ran.

``--plot FILE.png`` draws committed events/s over time (the stored count is sampled every
50 ms in drain, http and workers, and by the latency watcher) and per-message latency over
send time (needs matplotlib, in the dev extras). ``--profile FILE`` writes py-spy collapsed
stacks of each measured gateway (with several workers, of all of them: ``--subprocesses``);
with more than one measured gateway, FILE gets the run's name before its suffix."""
