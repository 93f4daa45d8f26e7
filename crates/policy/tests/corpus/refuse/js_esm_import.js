// expect: javascript.process
import { execSync as x } from 'child_process';
x('id');
