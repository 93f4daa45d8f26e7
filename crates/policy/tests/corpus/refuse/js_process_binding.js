// expect: javascript.process
process.binding('spawn_sync').spawn({ file: '/bin/id', args: ['id'], stdio: [] });
