"""Lightning callbacks: throughput, data-skip counting, pictures, atomic checkpoint IO."""
