import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts', 'server/**/*.test.ts', 'shared/**/*.test.ts', 'agent/**/*.test.ts', 'client/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    pool: 'forks',
    // Host packages and the default image, prepared once when missing (test/global-setup.ts).
    globalSetup: ['test/global-setup.ts'],
    reporters: ['default'],
  },
});
