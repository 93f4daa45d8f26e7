// expect: javascript.process
Reflect.get(process, 'bin' + 'ding')('spawn_sync');
