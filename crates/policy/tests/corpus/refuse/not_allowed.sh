# expect: command.not-allowed
node -e 'require("child_process").execSync("id")'
