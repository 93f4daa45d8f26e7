// expect: javascript.process
with (process) { binding('spawn_sync'); }
