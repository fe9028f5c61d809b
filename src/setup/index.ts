// The one idempotent setup: Debian packages, the patched QEMU, the guest images, the TAP helper.
// Commands call it when they start; the data path (io, capture, replication, commit) never does.

export {
  REPO_ROOT,
  RUBATO_COMMAND,
  ensureAll,
  ensureBrowser,
  ensureDebianImage,
  ensureDebianUefiImage,
  ensureGuestImage,
  ensurePackages,
  ensurePatchedQemu,
  ensureServiceClients,
  ensureTapRelay,
  stockQemu,
} from './setup.ts';
