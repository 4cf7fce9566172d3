"""Snapshots read safely (`snapshot`), shard copies (`shard_copy`), warm starts (`pretrained`),
checkpoints (`checkpoint`), vocabularies (`vocab`) and their mapper (`vocab_mapper`)."""

import warnings

# torch deprecates ShardedTensor in favour of DTensor, but torchrec's sharded tables are
# ShardedTensors, so a user can do nothing about the notice. Silenced only where it is raised on
# behalf of this package's own modules; a user's code touching ShardedTensor still sees it.
warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning, module=r"recap_embed\.")
