"""The benchmark harness of ``python -m fastattn bench`` (and of ``python -m fastattn``'s short
table), shipped with the package so that any install can measure itself.

* :mod:`~fastattn.bench.cli`: the command line.
* :mod:`~fastattn.bench.forward`: the forward table, fastattn against its peers, case by case.
* :mod:`~fastattn.bench.peers`: the implementations timed, and the registry of the peers.
* :mod:`~fastattn.bench.cases`: the cases and their inputs;
  :mod:`~fastattn.bench.selfcases`: fastattn's variants against itself.
* :mod:`~fastattn.bench.backward`: the training table (``--backward``);
  :mod:`~fastattn.bench.e2e`: a whole model (``--e2e``); :mod:`~fastattn.bench.sweep`: the
  plot (``--plot``).
* :mod:`~fastattn.bench.timing`, :mod:`~fastattn.bench.ceilings`,
  :mod:`~fastattn.bench.machine`, :mod:`~fastattn.bench.cpuinfo`: timing, the measured
  ceilings and what the machine is.

Nothing here is imported by ``import fastattn``.
"""
