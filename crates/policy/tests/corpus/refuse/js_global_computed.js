// expect: javascript.process
globalThis[atob('cmVxdWlyZQ==')]('child_process');
